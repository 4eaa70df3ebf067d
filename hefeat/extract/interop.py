"""Per-slide HDF5 interop with CLAM/TRIDENT-style tools: export a store's features, import existing ones."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.runner import SlideRunner
from hefeat.store import commit, faults, ids, layout
from hefeat.store.atomic import atomic_path, write_json
from hefeat.store.catalog import Store
from hefeat.store.features import FeatureFileWriter, refresh_aggregates
from hefeat.store.runs import timestamp
from hefeat.store.tables import write_parquet


def export_h5(store: Store, extraction_id: str, outdir: str | os.PathLike) -> dict:
    """Copy an extraction's per-slide HDF5 files (features [N, D], coords [N, 2] + attrs) to `outdir`."""
    import h5py

    ext = store.extraction(extraction_id)
    rows = store.sql("SELECT slide_id, n_tiles FROM features_index WHERE extraction_id = ? ORDER BY 1", [extraction_id])
    if rows.empty:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides to export")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise HefeatError(f"Export target {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    power = store.sql("SELECT slide_id, objective_power FROM slides").set_index("slide_id")["objective_power"]
    for sid in rows["slide_id"]:
        with atomic_path(out / f"{sid}.h5") as tmp:
            shutil.copyfile(store.features_path(extraction_id, sid), tmp)
            with h5py.File(tmp, "r+") as f:
                if "aggregates" in f:  # hefeat's own slide sums: not part of the CLAM/TRIDENT layout
                    del f["aggregates"]
                c = f["coords"]
                c.attrs["patch_level"] = 0
                c.attrs["level0_magnification"] = float(power.get(sid) or 0.0)
                c.attrs["target_magnification"] = 10.0 / float(ext["mpp"]) if ext.get("mpp") else 0.0
    rows.to_csv(out / "manifest.csv", index=False)
    return {"extraction_id": extraction_id, "out": str(out), "slides": len(rows), "tiles": int(rows["n_tiles"].sum())}


def _own_export(store: Store, loaded: list) -> tuple[str, str] | None:
    """(extraction_id, tiling_id) when every file is a slide of one of this store's extractions with the same content.

    An exported file keeps the attributes hefeat wrote (extraction_id, tiling_id, slide_id); it is
    that extraction's slide when the digest of its coordinates and features (the one the commit record
    holds) matches, so content decides, not names or where the files sit.
    """
    names = {str(x[4].get("extraction_id", "")) for x in loaded}
    if len(names) != 1 or not (eid := names.pop()) or not layout.extraction_meta_path(store.root, eid).exists():
        return None
    done = store.finished("extraction", eid)
    digests = dict(zip(done["slide_id"], done["digest"], strict=True))
    for sid, X, C, _size0, attrs in loaded:
        if str(attrs.get("slide_id", sid)) != sid or sid not in digests:
            return None
        h = ids.new_hasher()  # the pipeline's slide digest: level-0 coords (int64), then the stored rows
        h.update(np.ascontiguousarray(C, np.int64).tobytes())
        h.update(np.ascontiguousarray(X).tobytes())
        if h.hexdigest() != digests[sid]:
            return None
    return eid, str(store.extraction(eid)["tiling_id"])


def import_h5(store: Store, folder: str | os.PathLike, *, encoder: str, patch_size_level0: float | None = None,
              allow_unmatched: bool = False) -> dict:
    """Bring per-slide HDF5 features (features, coords; one file per slide named <slide_id>.h5) into the store.

    Creates an 'imported' tiling from the coordinates and an extraction over it; ids derive from the
    files' content, so importing the same folder twice does nothing new, and importing this store's own
    export (`export_h5`) is recognised as the extraction it came from.
    """
    import h5py

    store.require()
    files = sorted(Path(folder).glob("*.h5"))
    if not files:
        raise HefeatError(f"No .h5 files in {folder}")
    known = set(store.sql("SELECT slide_id FROM slides")["slide_id"])
    unmatched = sorted(f.stem for f in files if f.stem not in known)
    if unmatched and not allow_unmatched:
        raise HefeatError(f"{len(unmatched)} files match no slide in the store: {', '.join(unmatched[:8])}. "
                          "Ingest those slides first (file name = slide_id) or pass --allow-unmatched.")
    files = [f for f in files if f.stem in known]
    coords_hash, feats_hash = hashlib.sha256(), hashlib.sha256()
    loaded = []
    dim = None
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if "features" not in h or "coords" not in h:
                    raise HefeatError(f"{f.name} lacks a 'features' or 'coords' dataset")
                X = h["features"][:]
                C = h["coords"][:].astype(np.int64)
                attrs = {**dict(h.attrs), **dict(h["coords"].attrs)}
        except OSError as e:
            raise HefeatError(f"Cannot read {f.name}: {e}") from None
        if X.ndim != 2 or C.shape != (len(X), 2):
            raise HefeatError(f"{f.name}: features {X.shape} and coords {C.shape} do not match ([N, D] and [N, 2])")
        if dim is not None and X.shape[1] != dim:
            raise HefeatError(f"{f.name} has {X.shape[1]}-d features, others {dim}-d: one encoder per import")
        dim = X.shape[1]
        size0 = patch_size_level0 or attrs.get("patch_size_level0")
        if size0 is None:
            steps = np.diff(np.unique(C[:, 0]))
            size0 = float(steps.min()) if len(steps) else float(attrs.get("patch_size", 224))
        coords_hash.update(f.stem.encode() + C.tobytes())
        feats_hash.update(f.stem.encode() + np.ascontiguousarray(X).tobytes())
        loaded.append((f.stem, X, C, float(size0), attrs))
    same = _own_export(store, loaded)
    if same is not None:  # this store's own export: the same tiling and extraction, nothing to import
        eid, tid = same
        return {"extraction_id": eid, "tiling_id": tid, "slides": len(loaded), "new": 0, "unmatched": unmatched,
                "failed": {}, "busy": [], "dim": int(dim), "tiles": int(sum(len(x[1]) for x in loaded)),
                "recognised": f"these files are extraction {eid} of this store (same slides, coordinates and features)"}
    tid = ids.imported_tiling_id(coords_hash.hexdigest(), encoder)
    first = loaded[0][4]
    tparams = {"tiling_id": tid, "mpp": float(first.get("mpp", 0.0) or 0.0), "size": int(first.get("patch_size", 0) or 0),
               "background": "imported", "spots": False, "created": timestamp(),
               "params": {"imported_from": str(Path(folder).absolute()), "encoder": encoder}}
    if not layout.tiling_meta_path(store.root, tid).exists():
        write_json(layout.tiling_meta_path(store.root, tid), tparams)
    eid = ids.imported_extraction_id(tid, feats_hash.hexdigest(), encoder)
    if not layout.extraction_meta_path(store.root, eid).exists():
        write_json(layout.extraction_meta_path(store.root, eid), {
            "extraction_id": eid, "tiling_id": tid, "encoder": encoder, "layer": first.get("layer") or None,
            "weights": "imported", "weights_digest": str(first.get("weights_digest", "unknown")), "dim": int(dim),
            "precision": "imported", "tta": False, "dtype": str(loaded[0][1].dtype), "imported": True,
            "patch_size": tparams["size"], "mpp": tparams["mpp"], "created": timestamp()})
    by_id = {x[0]: x for x in loaded}
    with SlideRunner(store, "extraction", eid) as runner:
        for task in runner.claimed(sorted(by_id)):
            sid, X, C, size0, _attrs = by_id[task.slide_id]
            try:
                tiles = pd.DataFrame({"tiling_id": tid, "slide_id": sid, "tile_id": np.arange(len(C), dtype=np.int64),
                                      "x": C[:, 0], "y": C[:, 1], "size0": size0,
                                      "row": np.round(C[:, 1] / size0).astype(np.int32),
                                      "col": np.round(C[:, 0] / size0).astype(np.int32)})
                write_parquet(tiles, store.tiles_path(tid, sid), kind="tiles")
                commit.commit_ok(store, "tiling", tid, sid, n_tiles=len(C), seconds=0.0,
                                 digest=ids.frame_fingerprint(tiles))
                w = FeatureFileWriter(store.features_path(eid, sid), len(X), X.shape[1], dtype=str(X.dtype), coords=C,
                                      attrs={"encoder": encoder, "dim": int(dim), "patch_size_level0": size0,
                                             "tiling_id": tid, "extraction_id": eid, "slide_id": sid})
                try:
                    faults.point("features.write")
                    w.write(0, X)
                    faults.point("features.rename")
                    w.commit()
                except BaseException:
                    w.abort()
                    raise
                faults.point("features.renamed")
            except Exception as e:
                runner.fail(task, e)
                continue
            runner.ok(task, n_tiles=len(X), digest=ids.array_digest(C.astype(np.int64), X), dim=int(dim))
    s = runner.summary
    if s.ok:
        refresh_aggregates(store, eid)
    return {"extraction_id": eid, "tiling_id": tid, "slides": len(loaded), "new": len(s.ok), "unmatched": unmatched,
            "failed": s.failed, "busy": s.busy, "dim": int(dim), "tiles": int(sum(len(x[1]) for x in loaded))}
