"""10x Genomics Visium: a Space Ranger ``outs/`` folder.

As 10x documents it (Space Ranger 1.x-3.x, "Spatial Outputs" and "Feature-Barcode Matrix HDF5
format", version 2 of the HDF5 layout, Cell Ranger >= 3.0):

- ``filtered_feature_bc_matrix.h5``: group ``matrix`` with ``barcodes``, ``data``, ``indices``,
  ``indptr``, ``shape`` (CSC, features x barcodes) and ``matrix/features`` with ``id``, ``name``,
  ``feature_type``, ``genome``;
- ``spatial/tissue_positions.csv`` (Space Ranger >= 2.0, with the header ``barcode, in_tissue,
  array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``) or ``spatial/tissue_positions_list.csv``
  (1.x, the same columns without a header);
- ``spatial/scalefactors_json.json`` with ``spot_diameter_fullres`` (pixels of the full-resolution
  image) among ``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``fiducial_diameter_fullres``.

Visium spots are 55 µm across (100 µm centre to centre), so µm/px = 55 / spot_diameter_fullres.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hefeat.errors import HefeatError
from hefeat.formats.common import text_head
from hefeat.formats.spots import SpotSet, check_scale, sum_duplicate_genes

SPOT_DIAMETER_UM = 55.0
POSITION_FIELDS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
H5_FIELDS = ["matrix/barcodes", "matrix/data", "matrix/indices", "matrix/indptr", "matrix/shape",
             "matrix/features/id", "matrix/features/name"]
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ndpi", ".jpg", ".jpeg", ".png")


def _text(a) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in a]


def read_10x_h5(path: str | os.PathLike) -> tuple[list[str], pd.DataFrame, sp.csr_matrix]:
    """(barcodes, features id/name/feature_type, counts (n_barcodes, n_features) CSR) of a 10x HDF5 matrix."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise HefeatError(f"Visium matrix: file not found: {p}")
    try:
        f = h5py.File(p, "r")
    except OSError:
        raise HefeatError(f"Visium matrix {p.name} is not an HDF5 file (truncated download, or another format)") from None
    with f:
        missing = [k for k in H5_FIELDS if k not in f]
        if missing:
            raise HefeatError(f"Visium matrix {p.name}: missing field {missing[0]!r} (not a 10x feature-barcode HDF5, "
                              "version 2; matrices from Cell Ranger < 3 are not read)")
        g = f["matrix"]
        shape = tuple(int(v) for v in g["shape"][()])
        barcodes = _text(g["barcodes"][()])
        feats = pd.DataFrame({"id": _text(g["features/id"][()]), "name": _text(g["features/name"][()])})
        feats["feature_type"] = _text(g["features/feature_type"][()]) if "feature_type" in g["features"] else "Gene Expression"
        data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
    if len(shape) != 2 or shape != (len(feats), len(barcodes)) or len(indptr) != len(barcodes) + 1:
        raise HefeatError(f"Visium matrix {p.name}: field 'matrix/shape' {shape} does not fit {len(feats)} features x "
                          f"{len(barcodes)} barcodes (truncated?)")
    m = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr()
    return barcodes, feats, m


def read_positions(spatial: str | os.PathLike) -> pd.DataFrame:
    """tissue_positions.csv (header) or tissue_positions_list.csv (none) as a table of POSITION_FIELDS."""
    spatial = Path(spatial)
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    path = new if new.is_file() else old
    if not path.is_file():
        raise HefeatError(f"Visium: neither tissue_positions.csv nor tissue_positions_list.csv in {spatial}")
    head = text_head(path, "Visium positions")
    has_header = head.split("\n", 1)[0].strip().startswith("barcode")
    try:
        df = pd.read_csv(path, header=0 if has_header else None, dtype={0: str})
    except Exception as e:
        raise HefeatError(f"Visium positions {path.name} cannot be read: {str(e).splitlines()[0]}") from None
    if not has_header:
        if df.shape[1] != len(POSITION_FIELDS):
            raise HefeatError(f"Visium positions {path.name}: {df.shape[1]} columns, expected the six fields "
                              f"{', '.join(POSITION_FIELDS)}")
        df.columns = POSITION_FIELDS
    missing = [c for c in POSITION_FIELDS if c not in df.columns]
    if missing:
        raise HefeatError(f"Visium positions {path.name}: missing field {missing[0]!r}")
    for c in POSITION_FIELDS[1:]:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            raise HefeatError(f"Visium positions {path.name}: field {c!r} is not a number on data row {int(v.isna().idxmax()) + 1}")
        df[c] = v
    df.attrs["path"] = path
    return df


def read_scalefactors(path: str | os.PathLike) -> dict:
    """scalefactors_json.json; spot_diameter_fullres is required."""
    p = Path(path)
    text = text_head(p, "Visium scale factors", n=1 << 16)
    try:
        d = json.loads(text)
    except ValueError:
        raise HefeatError(f"Visium scale factors {p.name} is not JSON") from None
    if "spot_diameter_fullres" not in d:
        raise HefeatError(f"Visium scale factors {p.name}: missing field 'spot_diameter_fullres' (needed for µm/px)")
    d["spot_diameter_fullres"] = check_scale(d["spot_diameter_fullres"], p, "spot_diameter_fullres", "Visium scale factors")
    return d


def find_image(outs: Path) -> Path | None:
    """The one image file next to outs/ (Space Ranger's --image input kept beside it), if exactly one."""
    hits = [q for q in outs.parent.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
    return hits[0] if len(hits) == 1 else None


def read_visium(outs: str | os.PathLike, image: str | os.PathLike | None = None, *, sample: str | None = None) -> SpotSet:
    """A Space Ranger outs/ folder -> SpotSet (spots under tissue in the filtered matrix; µm/px from the 55 µm spot)."""
    outs = Path(outs)
    if (outs / "outs").is_dir():
        outs = outs / "outs"
    if not outs.is_dir():
        raise HefeatError(f"Visium: {outs} is not a Space Ranger outs/ folder")
    h5 = outs / "filtered_feature_bc_matrix.h5"
    barcodes, feats, counts = read_10x_h5(h5)
    pos = read_positions(outs / "spatial")
    sf = read_scalefactors(outs / "spatial" / "scalefactors_json.json")
    pos = pos.set_index("barcode")
    absent = [b for b in barcodes if b not in pos.index]
    if absent:
        raise HefeatError(f"Visium matrix {h5.name}: field 'matrix/barcodes' has {len(absent)} barcodes absent from "
                          f"{pos.attrs['path'].name} (e.g. {absent[0]}); matrix and positions are from different runs")
    notes = [f"Space Ranger positions: {pos.attrs['path'].name}"]
    gex = (feats["feature_type"] == "Gene Expression").to_numpy()
    if not gex.all():
        notes.append(f"{int((~gex).sum())} non-gene-expression features left out")
    counts = counts[:, np.flatnonzero(gex)]
    counts, genes = sum_duplicate_genes(counts, feats.loc[gex, "name"].tolist(), notes)
    p = pos.loc[barcodes]
    off = int((p["in_tissue"] != 1).sum())
    if off:
        notes.append(f"{off} barcodes of the matrix are outside the tissue (in_tissue = 0): kept")
    spots = pd.DataFrame({"spot_id": barcodes, "x": p["pxl_col_in_fullres"].to_numpy(float),
                          "y": p["pxl_row_in_fullres"].to_numpy(float),
                          "array_row": p["array_row"].to_numpy(int), "array_col": p["array_col"].to_numpy(int)})
    mpp = SPOT_DIAMETER_UM / sf["spot_diameter_fullres"]
    notes.append(f"µm/px = 55 µm / spot_diameter_fullres {sf['spot_diameter_fullres']:.4g} px = {mpp:.4g}")
    img = Path(image) if image else find_image(outs)
    if img is None:
        raise HefeatError(f"Visium {outs}: name the full-resolution H&E given to Space Ranger (--image); "
                          "none (or several) sits next to outs/")
    return SpotSet(sample=sample or outs.parent.name, spots=spots, counts=counts, genes=genes,
                   spot_diameter_um=SPOT_DIAMETER_UM, mpp=mpp, technology="Visium", image=img, source=outs, notes=notes,
                   mpp_from="55 µm / spot_diameter_fullres")
