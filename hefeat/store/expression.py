"""Bulk expression stored as a wide numeric matrix: one FLOAT[] row per sample, genes in a fixed order.

10,000 samples x 20,000 genes is 800 MB as float32 here, against ~39 GB as long rows in pandas.
`read_matrix` returns it as one float32 array without a pivot; the `expression` view
(dataset, sample_id, gene, value) stays for SQL users.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.ids import new_hasher

READ_ROWS = 1024  # samples per record batch when the matrix is read (20,000 genes: 80 MB; 256 read 10,000 x 20,000
# in 2.5-3.9 s, 1,024 in 2.6-2.7 s, three runs each in alternation)

if TYPE_CHECKING:  # pragma: no cover
    from hefeat.store.catalog import Store


def matrix_fingerprint(sample_ids: list[str], genes: list[str], values: np.ndarray) -> str:
    """Content hash of an expression matrix: sample ids, genes and float32 values (NaN = missing), in sample order."""
    order = np.argsort(np.asarray(sample_ids, dtype=object), kind="stable")
    h = new_hasher()
    h.update("\x1f".join(sample_ids[i] for i in order).encode())
    h.update(b"\x1e" + "\x1f".join(genes).encode() + b"\x1e")
    v = np.ascontiguousarray(np.asarray(values, np.float32)[order])
    v = np.where(np.isnan(v), np.float32(np.nan), v)  # one NaN bit pattern
    h.update(memoryview(v).cast("B"))
    return h.hexdigest()[:16]


def write_matrix(con, dataset: str, sample_ids: list[str], genes: list[str], values: np.ndarray, *,
                 source: str, source_fingerprint: str | None, orientation: str) -> dict:
    """Replace dataset `dataset` in the catalog (inside the caller's transaction); returns its info row."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, np.float32)
    n, g = values.shape
    if n != len(sample_ids) or g != len(genes):
        raise ValueError("values must be (n_samples, n_genes)")
    fp = matrix_fingerprint(sample_ids, genes, values)
    missing = np.isnan(values)
    flat = pa.array(values.ravel(), mask=missing.ravel() if missing.any() else None)
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * g + 1, g, dtype=np.int32)), flat)
    tbl = pa.table({"dataset": pa.array([dataset] * n), "sample_id": pa.array(sample_ids, pa.string()), "values": lists})
    gtbl = pa.table({"dataset": pa.array([dataset] * g), "pos": pa.array(np.arange(1, g + 1, dtype=np.int32)),
                     "gene": pa.array(genes, pa.string())})
    for t in ("expression_matrix", "expression_genes", "expression_datasets"):
        con.execute(f"DELETE FROM {t} WHERE dataset = ?", [dataset])
    con.register("_hefeat_matrix", tbl)
    con.register("_hefeat_genes", gtbl)
    try:
        con.execute('INSERT INTO expression_matrix SELECT dataset, sample_id, CAST("values" AS FLOAT[]) FROM _hefeat_matrix')
        con.execute("INSERT INTO expression_genes SELECT dataset, pos, gene FROM _hefeat_genes")
    finally:
        con.unregister("_hefeat_matrix")
        con.unregister("_hefeat_genes")
    info = {"dataset": dataset, "n_samples": n, "n_genes": g, "n_missing": int(missing.sum()), "fingerprint": fp,
            "source": source, "source_fingerprint": source_fingerprint, "orientation": orientation}
    con.execute("INSERT INTO expression_datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())", list(info.values()))
    return info


def read_matrix(store: Store, dataset: str = "expression", genes: list[str] | None = None, *,
                dtype=np.float32, convert: Callable[[np.ndarray], None] | None = None
                ) -> tuple[list[str], list[str], np.ndarray]:
    """(sample_ids, genes, values (n_samples, n_genes), float32 unless `dtype` says) of a dataset, samples sorted.

    `genes` picks columns in the given order (unknown genes are a one-line error); missing values are NaN.
    `dtype` (e.g. float64) and `convert` (applied in place to each batch of rows as it lands, e.g. a transform) give
    the matrix a fit needs in one pass, without a float32 copy of it first.
    """
    import pyarrow.compute as pc

    store.expression_info(dataset)
    all_genes = store.sql("SELECT gene FROM expression_genes WHERE dataset = ? ORDER BY pos", [dataset])["gene"].tolist()
    if genes is None:
        sel, out_genes = '"values"', all_genes
    else:
        pos = {g: i + 1 for i, g in enumerate(all_genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise HefeatError(f"{len(missing)} genes are not in expression dataset {dataset!r}: "
                              f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        out_genes = list(genes)
        sel = f'list_select("values", {[pos[g] for g in genes]})' if genes else "[]::FLOAT[]"
    # Streamed in record batches into one preallocated array: the whole result never exists as an Arrow
    # table, a flattened copy and a NaN-filled copy at once (5 GB at 10,000 x 20,000 instead of 0.8 GB).
    ids = store.sql("SELECT sample_id FROM expression_matrix WHERE dataset = ? ORDER BY sample_id",
                    [dataset])["sample_id"].tolist()
    where = pd.Index(ids)
    if not where.is_unique:
        raise HefeatError(f"Expression dataset {dataset!r} lists a sample twice; re-ingest it")
    g = len(out_genes)
    out = np.empty((len(ids), g), dtype)
    filled = np.zeros(len(ids), bool)

    def fill(cur, statement, params):
        rel = cur.sql(statement.query, params=params or None)
        for batch in (getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch)(READ_ROWS):
            rows = where.get_indexer(batch.column(0).to_pylist())
            flat = batch.column(1).flatten()
            # No missing value (the usual case): the batch's floats as they are, copied once into place.
            flat = (pc.fill_null(flat, np.nan) if flat.null_count else flat).to_numpy(zero_copy_only=False)
            if (rows < 0).any() or flat.size != len(rows) * g:
                raise HefeatError(f"Expression dataset {dataset!r} is inconsistent (rows of different lengths, or "
                                  "changed while read); re-ingest it")
            block = flat.reshape(len(rows), g)
            if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
                dst = out[rows[0]:rows[-1] + 1]  # a run of rows (the usual case): converted where it lands
                dst[...] = block
                if convert is not None:
                    convert(dst)
            else:
                if convert is not None:
                    block = block.astype(dtype)
                    convert(block)
                out[rows] = block
            filled[rows] = True

    store._run(f'SELECT sample_id, {sel} AS v FROM expression_matrix WHERE dataset = ?', [dataset], None, fill)
    if not filled.all():
        raise HefeatError(f"Expression dataset {dataset!r} changed while it was read; read it again")
    return ids, out_genes, out
