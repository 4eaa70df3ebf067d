"""Wide Parquet tables (a gene per column) written from numpy columns read back exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.store.tables import WIDE, write_parquet


def test_wide_table_roundtrips_with_mixed_columns(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(7, WIDE + 5)), columns=[f"G{j:05d}" for j in range(WIDE + 5)])
    df.insert(0, "fold", pd.Categorical(list("abcabca")))
    df.insert(0, "sample_id", [f"s{i}" for i in range(7)])
    df["n"] = np.arange(7)
    df["f32"] = np.arange(7, dtype=np.float32)
    df.iloc[2, 5] = np.nan
    write_parquet(df, tmp_path / "w.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "w.parquet"), df)


def _fit_like_frame(n: int, g: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A frame built as fit genes builds its out-of-fold table: one float64 array wrapped without a copy,
    id columns inserted in front. Values include NaN, ±0, ±inf, subnormals and extremes."""
    rng = np.random.default_rng(seed)
    a = 2 + 0.05 * rng.standard_normal((n, g))
    a.flat[[0, 5, 9, 17, 23, 31]] = [np.nan, -0.0, np.inf, -np.inf, 5e-324, np.finfo(float).max]
    df = pd.DataFrame(a, columns=[f"G{j:05d}" for j in range(g)], copy=False)
    df.insert(0, "fold", [f"f{i % 3}" for i in range(n)])
    df.insert(0, "sample_id", [f"S{i}" for i in range(n)])
    return df, a


def test_wide_fit_table_is_read_back_bit_for_bit_by_pandas_and_duckdb(tmp_path, monkeypatch):
    """Threaded column-major layout in tiles (here 7 x 7, 2 threads, short last tiles both ways): every reader
    gets the same bits, column order and dtypes."""
    import duckdb

    from hefeat.store import tables

    monkeypatch.setattr(tables, "SLAB", 7)
    monkeypatch.setattr(tables, "available_cores", lambda: 2)
    df, a = _fit_like_frame(11, WIDE + 9)
    write_parquet(df, tmp_path / "w.parquet")
    back = pd.read_parquet(tmp_path / "w.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert np.array_equal(back.iloc[:, 2:].to_numpy().view(np.int64), a.view(np.int64))
    con = duckdb.connect()
    db = con.execute(f"SELECT * FROM read_parquet('{tmp_path / 'w.parquet'}')").df()
    assert list(db.columns) == list(df.columns)
    assert np.array_equal(db.iloc[:, 2:].to_numpy().view(np.int64), a.view(np.int64))
    one = con.execute(f"SELECT G00003 FROM read_parquet('{tmp_path / 'w.parquet'}')").fetchnumpy()["G00003"]
    assert np.array_equal(np.asarray(one).view(np.int64), a[:, 3].view(np.int64))


def test_wide_float_columns_are_stored_uncompressed_and_the_rest_zstd(tmp_path):
    """zstd saves ~10 % on predicted floats for more than half the write and 3x the read time: a wide
    table's floats go uncompressed, its id columns stay zstd; a narrow table is all zstd as before."""
    import pyarrow.parquet as pq

    df, _ = _fit_like_frame(5, WIDE + 2)
    write_parquet(df, tmp_path / "w.parquet")
    rg = pq.ParquetFile(tmp_path / "w.parquet").metadata.row_group(0)
    codec = {rg.column(i).path_in_schema: rg.column(i).compression for i in range(rg.num_columns)}
    assert codec["sample_id"] == codec["fold"] == "ZSTD"
    assert {codec[c] for c in df.columns[2:]} == {"UNCOMPRESSED"}
    write_parquet(df.iloc[:, :10], tmp_path / "n.parquet")
    rg = pq.ParquetFile(tmp_path / "n.parquet").metadata.row_group(0)
    assert {rg.column(i).compression for i in range(rg.num_columns)} == {"ZSTD"}


def test_a_fit_frames_float_block_is_laid_out_once_not_selected_first(monkeypatch, tmp_path):
    """The float columns of a frame wrapping one array are read as a view of it (no column-selection copy
    of samples x genes before the column-major copy)."""
    from hefeat.store import tables

    df, a = _fit_like_frame(6, WIDE + 3)
    seen = []
    real = tables._column_major

    def spy(block):
        seen.append(np.shares_memory(block, a))
        return real(block)

    monkeypatch.setattr(tables, "_column_major", spy)
    write_parquet(df, tmp_path / "w.parquet")
    assert seen == [True]


def test_fit_genes_tables_written_wide_read_the_same_everywhere(learned_base, tmp_path, monkeypatch):
    """The 40-slide cohort's 80-gene fit with every table forced through the wide path (WIDE = 5): its
    tables read back equal to the narrow path's, and the report and `hefeat report` read them (the report
    only the out-of-fold columns it draws)."""
    import shutil

    from click.testing import CliRunner

    from hefeat.cli import main as cli
    from hefeat.learn.emo import GenesParams
    from hefeat.learn.registry import fit_model
    from hefeat.learn.report import report
    from hefeat.store import tables
    from hefeat.store.catalog import Store
    from hefeat.store.models import load_table

    st0, eid, _, _ = learned_base
    stores = {}
    for name, wide in (("narrow", WIDE), ("wide", 5)):
        root = tmp_path / name
        shutil.copytree(st0.root, root, ignore=shutil.ignore_patterns("models", "predictions"))
        monkeypatch.setattr(tables, "WIDE", wide)
        st = Store(root)
        s = fit_model(st, "genes", GenesParams(extraction_id=eid, permutations=1))
        stores[name] = (st, s["model_id"])
    (a, mid), (b, mid_b) = stores["narrow"], stores["wide"]
    assert mid == mid_b
    import pyarrow.parquet as pq

    codec = pq.ParquetFile(b.model_dir(mid) / "oof_predictions.parquet").metadata.row_group(0).column(5).compression
    assert codec == "UNCOMPRESSED"  # the wide path was taken
    for t in ("metrics", "oof_predictions", "null"):
        pd.testing.assert_frame_equal(load_table(a, mid, t), load_table(b, mid, t))
    reads, real_read = [], pd.read_parquet

    def spy(path, *args, **kw):
        reads.append((str(path), kw.get("columns")))
        return real_read(path, *args, **kw)

    monkeypatch.setattr(pd, "read_parquet", spy)
    ra, rb = report(a, mid, tmp_path / "ra"), report(b, mid, tmp_path / "rb")
    # The report reads the out-of-fold columns it draws (ids, top 6, proliferation genes), not all 80.
    oof_cols = [c for p, c in reads if p.endswith("oof_predictions.parquet")]
    assert len(oof_cols) == 2 and all(c is not None and "sample_id" in c and 7 <= len(c) < 40 for c in oof_cols)
    assert [p.rsplit("/", 1)[1] for p in ra["files"]] == [p.rsplit("/", 1)[1] for p in rb["files"]]
    assert len(rb["files"]) >= 2  # the top-genes figure reads the out-of-fold table
    res = CliRunner().invoke(cli, ["report", mid, "--store", str(b.root)])
    assert res.exit_code == 0, res.output
