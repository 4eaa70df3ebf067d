"""Tile every slide of a store: the tiling step run by the per-slide runner."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.runner import RunSummary, run_slides, shard_slides
from hefeat.slides.reader import Slide
from hefeat.slides.tiling import TilingParams, spot_tiles, tile_slide
from hefeat.store.atomic import clean_stale_tmp, write_json
from hefeat.store.catalog import Store
from hefeat.store.ids import content_id, file_fingerprint
from hefeat.store.runs import record_run, timestamp
from hefeat.store.tables import write_parquet


def tiling_id(params: TilingParams) -> str:
    """Content-derived id of a tiling."""
    return content_id(params.to_dict(), prefix="t")


def open_catalog_slide(row: pd.Series, *, verify: bool = True) -> Slide:
    """Open a catalogued slide; with verify (batch jobs that store results) check it is the ingested file.

    Interactive reads (a tile image, a heatmap) skip the 2 MiB fingerprint hash.
    """
    if not Path(row["path"]).exists():
        raise HefeatError(f"slide file {row['path']} is gone; re-ingest it or restore the file")
    if verify and file_fingerprint(row["path"]) != row["fingerprint"]:
        raise HefeatError(f"slide file {row['path']} changed since ingest (fingerprint differs); re-ingest it under a new slide_id")
    return Slide(row["path"], mpp=float(row["mpp_x"]))


def run_tiling(
    store: Store,
    params: TilingParams,
    *,
    slides: list[str] | None = None,
    shard: str | None = None,
    fail_fast: bool = False,
    progress: bool = False,
    threads: int | None = None,
    qc_thumbnails: bool = False,
) -> RunSummary:
    """Tile the store's slides (or `slides`) with `params`; skips slides already tiled.

    qc_thumbnails writes reports/qc-<tiling>/<slide>.png (thumbnail, mask outline, tiles) per tiled slide.
    """
    store.require()
    tid = tiling_id(params)
    table = store.slides(slides)
    if table.empty:
        raise HefeatError(f"No slides in {store.root}. Add some: hefeat ingest slides PATH...")
    spots = None
    no_spots: list[str] = []
    if params.spots:
        spots = store.sql("SELECT slide_id, spot_id, x, y FROM spots")
        have = set(spots["slide_id"])
        no_spots = sorted(set(table["slide_id"]) - have)
        if slides and no_spots:
            raise HefeatError(f"Slides without spots cannot get a spot tiling: {', '.join(no_spots)}. Ingest spots first.")
        if not have:
            raise HefeatError("No spots in the store. Ingest them first: hefeat ingest spots spots.parquet")
        table = table[table["slide_id"].isin(have)]
    table = table.set_index("slide_id")
    ids = shard_slides(list(table.index), shard)

    tdir = store.tiling_dir(tid)
    tdir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(tdir)
    meta = tdir / "_tiling.json"
    if not meta.exists():
        write_json(meta, {"tiling_id": tid, "mpp": params.mpp, "size": params.size, "background": params.background,
                          "spots": params.spots, "created": timestamp(), "params": params.to_dict()})

    def is_done(sid: str) -> bool:
        if store.tiles_path(tid, sid).exists():
            return True
        st = store.read_status("tiling", tid, sid)
        return bool(st and st.get("state") == "skipped")

    def step(sid: str) -> dict:
        row = table.loc[sid]
        with open_catalog_slide(row) as slide:
            tissue = None
            if params.spots:
                df = spot_tiles(slide, spots[spots["slide_id"] == sid], params, threads=threads)
            else:
                df, tissue = tile_slide(slide, params.for_slide(sid), threads=threads)
            if qc_thumbnails:
                from hefeat.slides.qc_thumbnail import write_qc_thumbnail

                write_qc_thumbnail(slide, tissue, df, store.qc_thumbnail_path(tid, sid))
        df.insert(0, "slide_id", sid)
        df.insert(0, "tiling_id", tid)
        write_parquet(df, store.tiles_path(tid, sid))
        return {"n_tiles": len(df)}

    summary = run_slides(store, "tiling", tid, ids, step, is_done=is_done, fail_fast=fail_fast,
                         progress=progress, desc=f"tiling {tid}")
    if no_spots:
        summary.extra["without_spots"] = no_spots
    summary.extra["tiling_id"] = tid
    summary.extra["run_id"] = record_run(store, "tile", summary.to_dict(), params=params.to_dict())
    return summary
