"""Spatial spot sets (coordinates and counts) into the catalog."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store
from hefeat.store.ids import file_fingerprint
from hefeat.store.ingest.common import IngestReport, first_cells, numeric_block, read_table


def ingest_spots(store: Store, path: str | os.PathLike, *, allow_unmatched: bool = False) -> IngestReport:
    """Ingest spatial spots: slide_id, spot_id, x, y (level-0 px of the centre), then one count column per gene."""
    store.require()
    df = read_table(path)
    need = {"slide_id", "spot_id", "x", "y"}
    if not need <= set(df.columns):
        raise HefeatError(f"Spots table needs columns {sorted(need)}; missing {sorted(need - set(df.columns))}")
    df["slide_id"] = df["slide_id"].astype(str)
    df["spot_id"] = df["spot_id"].astype(str)
    if df.duplicated(["slide_id", "spot_id"]).any():
        ex = df.loc[df.duplicated(["slide_id", "spot_id"]), ["slide_id", "spot_id"]].head(3).values.tolist()
        raise HefeatError(f"Spots table repeats (slide_id, spot_id) pairs, e.g. {ex}")
    ids = df["slide_id"] + ":" + df["spot_id"]
    xy = numeric_block(df[["x", "y"]], ids, "Spots table coordinates", allow_missing=False)
    if (xy < 0).any():
        raise HefeatError(f"Spots table has negative coordinates, e.g. {first_cells(df[['x', 'y']], xy < 0, ids)}; "
                          "x, y are level-0 pixels of the spot centre")
    df["x"], df["y"] = xy[:, 0], xy[:, 1]
    genes = [c for c in df.columns if c not in need]
    counts = numeric_block(df[genes], ids, "Spots table counts") if genes else np.zeros((len(df), 0))
    df[genes] = counts
    known = set(store.sql("SELECT slide_id FROM slides")["slide_id"])
    unmatched = sorted(set(df["slide_id"]) - known)
    if unmatched and not allow_unmatched:
        raise HefeatError(f"Spots on slides not in the store: {', '.join(unmatched[:8])}. Ingest those slides first.")
    df = df[df["slide_id"].isin(known)]
    long = df.melt(id_vars=["slide_id", "spot_id"], value_vars=genes, var_name="gene", value_name="count")
    rep = IngestReport("spots", unmatched=unmatched, rows=len(df), added=sorted(df["slide_id"].unique()))
    with store.connect(write=True) as con:
        con.register("new_spots", df[["slide_id", "spot_id", "x", "y"]])
        con.register("new_counts", long)
        con.execute("DELETE FROM spots WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("DELETE FROM spot_counts WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("INSERT INTO spots SELECT slide_id, spot_id, x, y FROM new_spots")
        con.execute("INSERT INTO spot_counts SELECT slide_id, spot_id, gene, count FROM new_counts")
        con.execute("INSERT INTO ingests VALUES ('spots', ?, ?, ?, now())", [str(path), file_fingerprint(path), len(df)])
    return rep


def check_spot_set(spots: pd.DataFrame, counts, genes: list[str], *, width: int, height: int, where: str) -> None:
    """A reader's spots are unique, finite and inside the image (level-0 px); counts are finite and >= 0."""
    if spots["spot_id"].duplicated().any():
        raise HefeatError(f"{where}: spot {spots.loc[spots['spot_id'].duplicated(), 'spot_id'].iloc[0]} appears twice")
    xy = spots[["x", "y"]].to_numpy(float)
    bad = ~np.isfinite(xy).all(1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HefeatError(f"{where}: {int(bad.sum())} spot centres lie outside the {width} x {height} px image, e.g. "
                          f"{spots['spot_id'].iloc[i]} at ({xy[i, 0]:.0f}, {xy[i, 1]:.0f}); is it the image the spots "
                          "were registered to (full resolution)?")
    data = counts.data if hasattr(counts, "data") else np.asarray(counts)
    if not np.isfinite(data).all() or (data < 0).any():
        raise HefeatError(f"{where}: counts must be finite and >= 0")
    if counts.shape != (len(spots), len(genes)):
        raise HefeatError(f"{where}: counts are {counts.shape}, spots x genes are ({len(spots)}, {len(genes)})")


def write_spot_set(store: Store, slide_id: str, spots: pd.DataFrame, counts, genes: list[str], *,
                   spot_diameter_um: float, technology: str, source: str | os.PathLike) -> IngestReport:
    """Replace one slide's spots and counts (non-zero counts only: a missing (spot, gene) is 0) and record
    its technology and spot diameter, in one transaction."""
    import scipy.sparse as sp

    from hefeat.store.schema import SPOT_META_DDL

    store.require()
    coo = sp.coo_matrix(counts)
    nz = coo.data != 0
    long = pd.DataFrame({"slide_id": slide_id, "spot_id": spots["spot_id"].to_numpy()[coo.row[nz]],
                         "gene": np.asarray(genes, dtype=object)[coo.col[nz]], "count": coo.data[nz].astype(float)})
    sp_df = pd.DataFrame({"slide_id": slide_id, "spot_id": spots["spot_id"].astype(str),
                          "x": spots["x"].astype(float), "y": spots["y"].astype(float)})
    meta = pd.DataFrame([{"slide_id": slide_id, "technology": technology, "spot_diameter_um": float(spot_diameter_um),
                          "source": str(Path(source).absolute())}])
    with store.connect(write=True) as con:
        con.execute(SPOT_META_DDL)
        con.register("new_spots", sp_df)
        con.register("new_counts", long)
        con.register("new_meta", meta)
        con.execute("DELETE FROM spots WHERE slide_id = ?", [slide_id])
        con.execute("DELETE FROM spot_counts WHERE slide_id = ?", [slide_id])
        con.execute("DELETE FROM spot_meta WHERE slide_id = ?", [slide_id])
        con.execute("INSERT INTO spots SELECT slide_id, spot_id, x, y FROM new_spots")
        con.execute("INSERT INTO spot_counts SELECT slide_id, spot_id, gene, count FROM new_counts")
        con.execute("INSERT INTO spot_meta SELECT slide_id, technology, spot_diameter_um, source FROM new_meta")
        con.execute("INSERT INTO ingests VALUES ('spots', ?, NULL, ?, now())", [str(source), len(sp_df)])
    return IngestReport("spots", added=[slide_id], rows=len(sp_df))
