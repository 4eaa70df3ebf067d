"""The original Spatial Transcriptomics format (Ståhl et al., Science 2016) that ST-Net (He et al. 2020) used.

A section is a counts table with one row per spot named ``XxY`` (array column x, row y, e.g.
``10x13``) and one column per gene, and the ST spot detector's table (Wong et al. 2018) with
``x, y, new_x, new_y, pixel_x, pixel_y, selected`` (tab- or comma-separated) giving each array
position's centre in pixels of the H&E image. Spots are 100 µm across on a 200 µm grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hefeat.errors import HefeatError
from hefeat.formats.common import text_head, to_float
from hefeat.formats.spots import SpotSet, sum_duplicate_genes

SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0


def read_counts(path: str | os.PathLike) -> pd.DataFrame:
    """ST counts: spots (XxY ids) x genes."""
    p = Path(path)
    text_head(p, "ST counts")
    try:
        df = pd.read_csv(p, sep="\t", index_col=0)
    except Exception as e:
        raise HefeatError(f"ST counts {p.name} cannot be read as a tab-separated table: {str(e).splitlines()[0]}") from None
    ids = df.index.astype(str)
    bad = ~ids.str.fullmatch(r"\d+(\.\d+)?x\d+(\.\d+)?")
    if bad.any():
        raise HefeatError(f"ST counts {p.name}: spot ids must be XxY (e.g. 10x13); row {int(bad.argmax()) + 1} is {ids[bad][0]!r}")
    for c in df.columns:
        df[c] = to_float(df[c], p, str(c), "ST counts")
    df.index = ids
    return df


def read_spot_table(path: str | os.PathLike) -> pd.DataFrame:
    """The spot detector's table: x, y (array), pixel_x, pixel_y (image), selected if present."""
    p = Path(path)
    head = text_head(p, "ST spot table")
    sep = "\t" if "\t" in head.splitlines()[0] else ","
    try:
        df = pd.read_csv(p, sep=sep)
    except Exception as e:
        raise HefeatError(f"ST spot table {p.name} cannot be read: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    for c in ("x", "y", "pixel_x", "pixel_y"):
        if c not in df.columns:
            raise HefeatError(f"ST spot table {p.name}: missing field {c!r} (spot detector columns x, y, new_x, new_y, "
                              "pixel_x, pixel_y, selected)")
        df[c] = to_float(df[c], p, c, "ST spot table")
    if "selected" in df.columns:
        df = df[pd.to_numeric(df["selected"], errors="coerce").fillna(0).astype(int) == 1]
    return df


def grid_mpp(table: pd.DataFrame) -> float:
    """µm/px from the 200 µm array pitch: least-squares pixels per array step in x and y."""
    steps = []
    for a, b in (("x", "pixel_x"), ("y", "pixel_y")):
        if table[a].nunique() > 1:
            steps.append(abs(np.polyfit(table[a].to_numpy(float), table[b].to_numpy(float), 1)[0]))
    if not steps or min(steps) <= 0:
        raise HefeatError("ST spot table: cannot estimate µm/px from one array row; pass --mpp")
    return SPOT_PITCH_UM / float(np.mean(steps))


def read_st(counts: str | os.PathLike, spots: str | os.PathLike, image: str | os.PathLike, *,
            mpp: float | None = None, sample: str | None = None) -> SpotSet:
    """Counts + spot-detector table + H&E image -> SpotSet (µm/px given, else from the 200 µm grid)."""
    c, t = read_counts(counts), read_spot_table(spots)
    key = t["x"].round().astype(int).astype(str) + "x" + t["y"].round().astype(int).astype(str)
    t = t.assign(spot_id=key.to_numpy()).drop_duplicates("spot_id").set_index("spot_id")
    cid = pd.Index([f"{int(round(float(a)))}x{int(round(float(b)))}" for a, b in (i.split("x") for i in c.index)])
    absent = [i for i, k in zip(c.index, cid, strict=True) if k not in t.index]
    if absent:
        raise HefeatError(f"ST counts {Path(counts).name}: {len(absent)} spots (e.g. {absent[0]}) have no row in "
                          f"{Path(spots).name} (field 'x'/'y', or not selected)")
    notes: list[str] = []
    if mpp is None:
        mpp = grid_mpp(t)
        notes.append(f"µm/px {mpp:.4g} estimated from the 200 µm spot pitch")
    pos = t.loc[cid]
    counts_m, genes = sum_duplicate_genes(sp.csr_matrix(c.to_numpy(float)), [str(g) for g in c.columns], notes)
    sp_df = pd.DataFrame({"spot_id": list(c.index), "x": pos["pixel_x"].to_numpy(float), "y": pos["pixel_y"].to_numpy(float)})
    return SpotSet(sample=sample or Path(image).stem, spots=sp_df, counts=counts_m, genes=genes,
                   spot_diameter_um=SPOT_DIAMETER_UM, mpp=mpp, technology="ST", image=Path(image), source=Path(counts),
                   notes=notes, mpp_from="the 200 µm spot pitch" if notes[:1] and "pitch" in notes[0] else "--mpp")
