"""Per-slide feature files (HDF5) and loading embeddings for any SQL filter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.atomic import tmp_path_for
from hefeat.store.catalog import Store


class FeatureFileWriter:
    """Writes one slide's `features` [N, D] and `coords` [N, 2] to a temporary HDF5, then renames it."""

    def __init__(self, path: Path, n: int, dim: int, *, dtype: str, coords: np.ndarray, attrs: dict):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path_for(self.path)
        self.n = n
        self.written = 0
        self.f = h5py.File(self.tmp, "w")
        self.feats = self.f.create_dataset("features", shape=(n, dim), dtype=dtype)  # contiguous
        c = self.f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            self.f.attrs[k] = v
            c.attrs[k] = v

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write rows [start, start + len(rows))."""
        self.feats[start:start + len(rows)] = rows.astype(self.feats.dtype, copy=False)
        self.written += len(rows)

    def commit(self) -> None:
        """Close, fsync and rename into place."""
        if self.written != self.n:
            raise HefeatError(f"feature file {self.path.name}: wrote {self.written} of {self.n} rows")
        self.f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def read_features(path: str | os.PathLike, rows: np.ndarray | None = None) -> np.ndarray:
    """Feature rows of one slide file (all, or the given tile ids) as float32 (n, dim)."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["features"]
        if rows is None:
            return ds[:].astype(np.float32)
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0:
            return np.zeros((0, ds.shape[1]), np.float32)
        if len(rows) > 0.25 * ds.shape[0]:
            return ds[:][rows].astype(np.float32)
        order = np.argsort(rows)
        uniq, inv = np.unique(rows[order], return_inverse=True)
        got = ds[uniq][inv]
        out = np.empty_like(got)
        out[order] = got
        return out.astype(np.float32)


def _feature_file(store: Store, eid: str, sid: str) -> Path:
    p = store.features_path(eid, sid)
    if not p.exists():
        raise HefeatError(f"Slide {sid} has no features in extraction {eid}; run hefeat extract for it")
    return p


def load_features(
    store: Store, extraction_id: str, query: str | None = None, *, slides: list[str] | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """(tile metadata, embeddings (n, dim) float32) for the rows of `query` (or all tiles of `slides`).

    `query` is SQL over the catalog returning at least slide_id and tile_id of this extraction's
    tiling; only the slides it names are read.
    """
    ext = store.extraction(extraction_id)
    tid = ext["tiling_id"]
    done = store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ?", [extraction_id])["slide_id"]
    if query is None:
        where = f"tiling_id = '{tid}'" + (" AND slide_id IN (" + ",".join(f"'{s}'" for s in slides) + ")" if slides else "")
        meta = store.sql(f"SELECT * FROM tiles WHERE {where} ORDER BY slide_id, tile_id")
        meta = meta[meta["slide_id"].isin(set(done))].reset_index(drop=True)
    else:
        meta = store.sql(query)
        if not {"slide_id", "tile_id"} <= set(meta.columns):
            raise HefeatError("The query must return slide_id and tile_id columns")
        if "tiling_id" in meta.columns and (meta["tiling_id"] != tid).any():
            raise HefeatError(f"The query returns tiles of another tiling; extraction {extraction_id} is on tiling {tid}")
    dim = int(ext["dim"])
    out = np.zeros((len(meta), dim), np.float32)
    for sid, idx in meta.groupby("slide_id", sort=False).indices.items():
        out[idx] = read_features(_feature_file(store, extraction_id, sid), meta["tile_id"].to_numpy()[idx])
    return meta, out


def iter_slide_features(store: Store, extraction_id: str, slides: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (slide_id, features (n, dim) float32) one slide at a time."""
    done = store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ? ORDER BY 1", [extraction_id])["slide_id"].tolist()
    if not done and not store.extraction_dir(extraction_id).exists():
        store.extraction(extraction_id)
    for sid in slides or done:
        yield sid, read_features(_feature_file(store, extraction_id, sid))


def feature_offsets(store: Store, extraction_id: str) -> pd.DataFrame:
    """Finished slides of an extraction in slide order with n_tiles and their first global row id (offset)."""
    store.extraction(extraction_id)
    fi = store.sql("SELECT slide_id, n_tiles FROM features_index WHERE extraction_id = ? ORDER BY slide_id", [extraction_id])
    if fi.empty:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides")
    fi["offset"] = np.concatenate([[0], np.cumsum(fi["n_tiles"].to_numpy())[:-1]])
    return fi


def read_global_rows(store: Store, extraction_id: str, offsets: pd.DataFrame, global_ids: np.ndarray) -> np.ndarray:
    """Feature rows (float32) for sorted global row ids, reading only the slides that hold them."""
    global_ids = np.asarray(global_ids, np.int64)
    parts = []
    for r in offsets.itertuples():
        sel = global_ids[(global_ids >= r.offset) & (global_ids < r.offset + r.n_tiles)]
        if len(sel):
            parts.append(read_features(store.features_path(extraction_id, r.slide_id), sel - r.offset))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def slide_means(store: Store, extraction_id: str, slides: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Mean embedding per slide (streamed: one slide in memory at a time)."""
    ids, rows = [], []
    for sid, f in iter_slide_features(store, extraction_id, slides):
        ids.append(sid)
        rows.append(f.mean(0) if len(f) else np.full(f.shape[1], np.nan, np.float32))
    if not ids:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides")
    return ids, np.stack(rows)
