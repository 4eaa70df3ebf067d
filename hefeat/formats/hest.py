"""HEST-1k samples (Jaume et al., "HEST-1k", NeurIPS 2024 Datasets & Benchmarks; huggingface MahmoodLab/hest).

A sample ``<id>`` of a HEST-1k download is ``st/<id>.h5ad`` (an AnnData: spots x genes counts,
``obsm['spatial']`` = spot centres (x, y) in pixels of the WSI), ``metadata/<id>.json`` (among its
fields ``pixel_size_um_estimated`` / ``pixel_size_um_embedded`` (µm/px of the WSI), ``spot_diameter``
and ``inter_spot_dist`` in µm, ``st_technology``, ``patient`` within ``dataset_title``) and ``wsis/<id>.tif``
(a pyramidal generic TIFF). Sections of one patient share its patient id, so patient-grouped splits
keep them together.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hefeat.errors import HefeatError
from hefeat.formats.common import text_head
from hefeat.formats.spots import SpotSet, check_scale, sum_duplicate_genes

PIXEL_FIELDS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


def sample_ids(root: str | os.PathLike) -> list[str]:
    """Sample ids of a HEST-1k download (the st/*.h5ad stems)."""
    root = Path(root)
    if not (root / "st").is_dir():
        raise HefeatError(f"HEST: {root} has no st/ folder (expected st/<id>.h5ad, metadata/<id>.json, wsis/<id>.tif)")
    return sorted(p.stem for p in (root / "st").glob("*.h5ad"))


def read_metadata(path: str | os.PathLike) -> dict:
    """A HEST metadata json with a usable pixel size and spot diameter (one-line error naming the field)."""
    p = Path(path)
    try:
        meta = json.loads(text_head(p, "HEST metadata", n=1 << 20))
    except ValueError:
        raise HefeatError(f"HEST metadata {p.name} is not JSON") from None
    px = next((k for k in PIXEL_FIELDS if meta.get(k) not in (None, "", "nan")), None)
    if px is None:
        raise HefeatError(f"HEST metadata {p.name}: missing field 'pixel_size_um_estimated' (or pixel_size_um_embedded)")
    meta["_mpp"] = check_scale(meta[px], p, px, "HEST metadata", hi=100.0)
    meta["_mpp_field"] = px
    if meta.get("spot_diameter") in (None, "", "nan"):
        raise HefeatError(f"HEST metadata {p.name}: missing field 'spot_diameter' (µm)")
    meta["_spot_um"] = check_scale(meta["spot_diameter"], p, "spot_diameter", "HEST metadata")
    return meta


def patient_of(meta: dict) -> str | None:
    """The patient a HEST sample's metadata names, qualified by its dataset ('Patient 1' recurs across studies):
    '<dataset_title> / <patient>'; None when the metadata names none."""
    p = meta.get("patient")
    if p is None or str(p).strip().lower() in ("", "nan", "none", "na"):
        return None
    title = str(meta.get("dataset_title") or "").strip()
    return f"{title} / {str(p).strip()}" if title and title.lower() != "nan" else str(p).strip()


def read_hest(root: str | os.PathLike, sample: str) -> SpotSet:
    """One HEST-1k sample -> SpotSet (counts from .X, or layers['counts'] when present)."""
    import anndata

    root = Path(root)
    h5ad, mj, wsi = root / "st" / f"{sample}.h5ad", root / "metadata" / f"{sample}.json", root / "wsis" / f"{sample}.tif"
    for p in (h5ad, mj, wsi):
        if not p.is_file():
            raise HefeatError(f"HEST sample {sample}: file not found: {p}")
    meta = read_metadata(mj)
    try:
        ad = anndata.read_h5ad(h5ad)
    except Exception as e:
        raise HefeatError(f"HEST {h5ad.name} is not a readable AnnData file: {type(e).__name__}") from None
    if "spatial" not in ad.obsm:
        raise HefeatError(f"HEST {h5ad.name}: missing field obsm['spatial'] (spot centres in WSI pixels)")
    xy = np.asarray(ad.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise HefeatError(f"HEST {h5ad.name}: field obsm['spatial'] is not (n_spots, 2) finite pixel coordinates")
    X = ad.layers.get("counts", ad.X)
    notes = [f"HEST: µm/px from {meta['_mpp_field']} = {meta['_mpp']:.4g}, spots {meta['_spot_um']:g} µm"]
    counts, genes = sum_duplicate_genes(sp.csr_matrix(X), [str(g) for g in ad.var_names], notes)
    spots = pd.DataFrame({"spot_id": [str(b) for b in ad.obs_names], "x": xy[:, 0], "y": xy[:, 1]})
    del ad, X
    gc.collect()  # AnnData leaves h5py-backed cycles; collected here, not in a process forked later (segfault)
    return SpotSet(sample=sample, spots=spots, counts=counts, genes=genes, spot_diameter_um=meta["_spot_um"],
                   mpp=meta["_mpp"], technology=str(meta.get("st_technology") or "unknown"), image=wsi, source=h5ad,
                   notes=notes, mpp_from=f"HEST metadata {meta['_mpp_field']}", patient=patient_of(meta))
