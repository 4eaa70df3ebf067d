"""The pixels of a tile, read from its slide at the tiling's resolution; which tiling a slide's tile is on."""

from __future__ import annotations

import numpy as np

from hefeat.errors import HefeatError
from hefeat.explore.values import is_sql, sql_values
from hefeat.store.catalog import Store


def slide_tilings(store: Store, slide_id: str) -> list[str]:
    """Tilings that have tiles for a slide."""
    t = store.sql("SELECT tiling_id FROM tilings ORDER BY created")["tiling_id"].tolist()
    return [x for x in t if store.tiles_path(x, slide_id).exists()]


def resolve_tiling(store: Store, slide_id: str, *, value: str | None = None, tiling_id: str | None = None,
                   extraction_id: str | None = None) -> str:
    """The one tiling a slide's map is drawn on: --extraction's, --tiling, the query's, or the slide's only one."""
    store.slides([slide_id])
    if extraction_id:
        t = store.extraction(extraction_id)["tiling_id"]
        if tiling_id and tiling_id != t:
            raise HefeatError(f"Extraction {extraction_id} is on tiling {t}, not {tiling_id}")
        tiling_id = t
    if tiling_id is None and value and is_sql(value):
        tiling_id = sql_values(store, value, tiling_id=None, slide_id=slide_id)[2]
    if tiling_id is None:
        have = slide_tilings(store, slide_id)
        if len(have) != 1:
            raise HefeatError(f"Slide {slide_id} has {len(have)} tilings ({', '.join(have) or 'none'}); "
                              "pass --extraction or --tiling (or return tiling_id from the query)")
        tiling_id = have[0]
    if not store.tiles_path(tiling_id, slide_id).exists():
        raise HefeatError(f"Slide {slide_id} has no tiles in tiling {tiling_id}")
    return tiling_id


def tile_row(store: Store, slide_id: str, tile_id: int, *, tiling_id: str | None = None,
             extraction_id: str | None = None) -> dict:
    """Metadata of one tile (x, y, size0, QC, tiling size and mpp) on its resolved tiling."""
    tid = resolve_tiling(store, slide_id, tiling_id=tiling_id, extraction_id=extraction_id)
    t = store.tiles(tid, slide_id)
    rows = t[t["tile_id"] == int(tile_id)]
    if rows.empty:
        raise HefeatError(f"Tile {slide_id}:{tile_id} does not exist in tiling {tid} ({len(t)} tiles, ids 0-{len(t) - 1})")
    r = rows.iloc[0].to_dict()
    r["tiling_id"] = tid
    tl = store.tiling(tid)
    r.update(size=int(tl["size"]), mpp=float(tl["mpp"]))
    return r


def tile_image(store: Store, slide_id: str, tile_id: int, **kw) -> np.ndarray:
    """RGB uint8 (size, size, 3) pixels of a tile."""
    from hefeat.slides.reader import open_catalog_slide

    r = tile_row(store, slide_id, tile_id, **kw)
    row = store.slides([slide_id]).iloc[0]
    with open_catalog_slide(row, verify=False) as s:
        return s.read(r["x"], r["y"], r["size"], r["mpp"])
