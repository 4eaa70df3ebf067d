"""Content-derived identifiers and data fingerprints: the same inputs always give the same id.

Every id formula of hefeat lives here (tiling, extraction, model, UMAP, index, neighbour query,
fine-tuning job, run). A result id hashes its parameters, the code version and the fingerprints of
the data it read, so a changed input gives a new id and a cached result is never stale:

    mid = model_id("gen-", "genes", params, inputs={
        "features": extraction_fingerprint(store, eid),
        "target": expression_fingerprint(store, "expression"),
        "slides": slide_set_fingerprint(store, slide_ids)})

Fingerprints are cheap: they read digests recorded when the data was written (per-slide output
digests in the commit records, the expression content hash stored at ingest), never the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hefeat import __version__

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hefeat.store.catalog import Store

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Major.minor of the package: a release that changes results changes every derived id.
CODE_VERSION = __version__.rsplit(".", 1)[0]


# -- hashing primitives -----------------------------------------------------------------------
def content_id(params: dict[str, Any], *, prefix: str = "", length: int = 12) -> str:
    """Hash of a JSON-serialisable parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:length]
    return f"{prefix}{digest}"


def new_hasher() -> Any:
    """The hash used for data digests (BLAKE2b, 128 bits; fast on bulk arrays)."""
    return hashlib.blake2b(digest_size=16)


def array_digest(*arrays: np.ndarray) -> str:
    """Digest of arrays' dtype, shape and bytes."""
    h = new_hasher()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def frame_fingerprint(df: pd.DataFrame) -> str:
    """Fingerprint of a DataFrame's columns, dtypes and values in row order."""
    import pandas as pd

    h = new_hasher()
    h.update(json.dumps([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Digest of a whole file's bytes (for small outputs such as a slide's tiles Parquet)."""
    h = new_hasher()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Slide fingerprint: file size plus a hash of its first and last MiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return f"{size}-{h.hexdigest()[:16]}"


def _combine(rows: Iterable[Iterable[Any]]) -> str:
    h = new_hasher()
    for r in rows:
        h.update(("\x1f".join("" if v is None else str(v) for v in r) + "\x1e").encode())
    return h.hexdigest()[:16]


# -- id validation ----------------------------------------------------------------------------
def check_id(value: str, what: str = "slide_id") -> str:
    """Validate an id used in file names (letters, digits, '.', '_', '-')."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        from hefeat.errors import HefeatError

        raise HefeatError(
            f"{what} {value!r} is not usable: expected letters, digits, '.', '_' or '-' "
            f"(at most 128 characters, not starting with punctuation). Rename it in the manifest."
        )
    return value


def sanitize_id(value: str) -> str:
    """Turn a file stem into a valid id by replacing other characters with '_'."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", value).lstrip("._-")
    return s[:128] or "slide"


# -- id formulas ------------------------------------------------------------------------------
def tiling_id(params: dict[str, Any]) -> str:
    """Id of a tiling: hash of every parameter that decides which tiles a slide gets."""
    return content_id(params, prefix="t")


def imported_tiling_id(coords_digest: str, encoder: str) -> str:
    """Id of a tiling brought in from per-slide HDF5 coordinates."""
    return content_id({"imported": coords_digest, "encoder": encoder}, prefix="t")


def extraction_id(tiling: str, encoder: dict[str, Any], *, precision: str, tta: bool, dtype: str,
                  inputs: dict[str, Any] | None = None) -> str:
    """Id of an extraction: tiling, encoder config (name, weights digest, layer, transform), precision, TTA,
    dtype, code, and `inputs`: what else changes the pixels the encoder sees (input plan, stain normalisation).

    `precision` is the spec as asked ('auto' included), never a measured outcome: an 'auto' extraction's
    decision is recorded inside it (layout.precision_decision_path), so every worker finds the same id."""
    return content_id({"tiling": tiling, "encoder": encoder, "precision": precision, "tta": tta, "dtype": dtype,
                       "inputs": inputs or {}, "code": CODE_VERSION}, prefix="e")


def imported_extraction_id(tiling: str, features_digest: str, encoder: str) -> str:
    """Id of features brought in from per-slide HDF5 files."""
    return content_id({"tiling": tiling, "features": features_digest, "encoder": encoder}, prefix="e")


def result_id(prefix: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Id of a derived result: parameters + code version + fingerprints of every input it read."""
    return content_id({"params": params, "inputs": dict(sorted(inputs.items())), "code": CODE_VERSION}, prefix=prefix)


def model_id(prefix: str, kind: str, params: dict[str, Any], inputs: dict[str, Any]) -> str:
    """Id of a fitted model: its method's prefix ('gen-'), kind, parameters and input fingerprints."""
    return result_id(prefix, {"kind": kind, "params": params}, inputs)


def umap_id(params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Id of a UMAP."""
    return result_id("u", params, inputs)


def index_id(params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Id of a neighbour index."""
    return result_id("i", params, inputs)


def query_id(params: dict[str, Any]) -> str:
    """Id of a saved neighbour query (its index id is in params and carries the data fingerprint)."""
    return content_id(params, prefix="q")


def finetune_job_id(recipe: dict[str, Any], precision: str, fingerprints: dict[str, Any]) -> str:
    """Id of a fine-tuning job ('ft-' prefix): its recipe, resolved precision and data fingerprints."""
    return result_id("ft-", {"recipe": recipe, "precision": precision}, fingerprints)


def run_id() -> str:
    """Id of one run record: time plus randomness (runs are events, not content)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


# -- data fingerprints (contract 2) ---------------------------------------------------------
def stage_fingerprint(store: Store, stage: str, key: str, slide_ids: Iterable[str] | None = None) -> str:
    """Fingerprint of a stage's finished slide set and their output contents (from the commit records)."""
    rows = store.finished(stage, key)
    if slide_ids is not None:
        rows = rows[rows["slide_id"].isin(set(slide_ids))]
    return _combine(rows[["slide_id", "n_tiles", "digest"]].sort_values("slide_id").itertuples(index=False))


def extraction_fingerprint(store: Store, extraction_id: str, slide_ids: Iterable[str] | None = None) -> str:
    """Fingerprint of an extraction's finished slides (or of `slide_ids` among them) and their feature files."""
    return stage_fingerprint(store, "extraction", extraction_id, slide_ids)


def tiling_fingerprint(store: Store, tiling_id: str, slide_ids: Iterable[str] | None = None) -> str:
    """Fingerprint of a tiling's finished slides and their tile tables."""
    return stage_fingerprint(store, "tiling", tiling_id, slide_ids)


def expression_fingerprint(store: Store, dataset: str = "expression") -> str:
    """Content hash of an expression dataset (samples, genes, values), computed at ingest."""
    return store.expression_info(dataset)["fingerprint"]


def slide_set_fingerprint(store: Store, slide_ids: Iterable[str] | None = None) -> str:
    """Fingerprint of a set of slides: ids, file fingerprints, MPP, patient and site (all slides if None)."""
    df = store.sql("SELECT slide_id, fingerprint, mpp_x, mpp_y, patient_id, site FROM slides ORDER BY slide_id")
    if slide_ids is not None:
        df = df[df["slide_id"].isin(set(slide_ids))]
    return _combine(df.itertuples(index=False))


def clinical_fingerprint(store: Store, columns: Iterable[str]) -> str:
    """Fingerprint of the clinical columns a result uses (key column + those columns, in key order)."""
    from hefeat.errors import HefeatError

    cols = sorted(set(columns))
    have = list(store.sql("SELECT * FROM clinical LIMIT 0").columns)
    key = "slide_id" if "slide_id" in have else "patient_id"
    missing = [c for c in cols if c not in have]
    if missing:
        raise HefeatError(f"Clinical columns not in the store: {', '.join(missing)}. Known: {', '.join(have)}")
    sel = ", ".join(f'"{c}"' for c in [key, *[c for c in cols if c != key]])
    return frame_fingerprint(store.sql(f"SELECT {sel} FROM clinical ORDER BY 1"))
