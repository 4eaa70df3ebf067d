"""Tile embeddings out the scverse way: AnnData (.h5ad) files that scanpy / squidpy read as they are.

One file per cohort (or per slide): X = tiles x features (float32); obs = the tile table (tile_id,
x, y, size0, QC columns; spot_id on spot tilings) plus slide_id, patient_id, site; obsm['spatial']
= tile centres in level-0 pixels (squidpy's convention), obsm['spatial_um'] = the same in µm;
uns['hefeat'] = extraction, tiling, encoder, and per slide its µm/px.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.atomic import atomic_path
from hefeat.store.catalog import Store
from hefeat.store.features import iter_slide_features


def _slide_frame(store: Store, tid: str, sid: str, n: int, slide: pd.Series) -> pd.DataFrame:
    t = store.tiles(tid, sid).reset_index(drop=True)
    if len(t) != n:
        raise HefeatError(f"Slide {sid}: {n} embeddings but {len(t)} tiles in tiling {tid}; re-extract it")
    t = t.drop(columns=[c for c in ("tiling_id", "slide_id", "patient_id", "site") if c in t.columns])
    t.insert(0, "site", slide["site"])
    t.insert(0, "patient_id", slide["patient_id"])
    t.insert(0, "slide_id", sid)
    return t


def _write(path: Path, X: np.ndarray, obs: pd.DataFrame, mpp: np.ndarray, uns: dict) -> None:
    import anndata

    obs = obs.reset_index(drop=True)
    obs.index = (obs["slide_id"].astype(str) + ":" + obs["tile_id"].astype(str)).to_numpy()
    for c in obs.columns:  # h5ad stores strings and numbers; categories keep files small
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str).astype("category")
    centre = obs[["x", "y"]].to_numpy(float) + obs["size0"].to_numpy(float)[:, None] / 2
    ad = anndata.AnnData(X=np.ascontiguousarray(X, dtype=np.float32), obs=obs)
    ad.var_names = [f"f{i}" for i in range(X.shape[1])]
    ad.obsm["spatial"] = centre
    ad.obsm["spatial_um"] = centre * mpp[:, None]
    ad.uns["hefeat"] = uns
    with atomic_path(path) as tmp:
        ad.write_h5ad(tmp)
    del ad
    gc.collect()  # no h5py objects left for a process forked later to collect


def export_anndata(store: Store, extraction_id: str, out: str | os.PathLike, *, per_slide: bool = False,
                   slides: list[str] | None = None) -> dict:
    """Write an extraction as out (one .h5ad; a folder of <slide_id>.h5ad with per_slide); returns a summary."""
    ext = store.extraction(extraction_id)
    tid = ext["tiling_id"]
    table = store.slides().set_index("slide_id")
    uns = {"extraction_id": extraction_id, "tiling_id": tid, "encoder": str(ext.get("encoder")),
           "dim": int(ext.get("dim") or 0), "mpp": float(ext.get("mpp") or 0.0)}
    out = Path(out)
    if per_slide:
        if out.exists() and not out.is_dir():
            raise HefeatError(f"Export target {out} is a file; --per-slide writes a folder")
        out.mkdir(parents=True, exist_ok=True)
    elif out.suffix != ".h5ad":
        raise HefeatError(f"Export target {out} should end in .h5ad (or pass --per-slide and a folder)")
    Xs, obs, mpps, files, n = [], [], [], [], 0
    for sid, X in iter_slide_features(store, extraction_id, slides):
        o = _slide_frame(store, tid, sid, len(X), table.loc[sid])
        mpp = np.full(len(o), float(table.loc[sid, "mpp_x"]))
        n += len(o)
        if per_slide:
            p = out / f"{sid}.h5ad"
            _write(p, X, o, mpp, {**uns, "slide_mpp": {sid: float(mpp[0]) if len(mpp) else 0.0}})
            files.append(str(p))
        else:
            Xs.append(np.asarray(X, np.float32))
            obs.append(o)
            mpps.append(mpp)
    if not n and not files:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides to export")
    if not per_slide:
        _write(out, np.concatenate(Xs), pd.concat(obs, ignore_index=True), np.concatenate(mpps),
               {**uns, "slide_mpp": {o["slide_id"].iloc[0]: float(m[0]) for o, m in zip(obs, mpps, strict=True) if len(o)}})
        files = [str(out)]
    return {"extraction_id": extraction_id, "files": files, "tiles": n, "slides": len(obs) or len(files)}
