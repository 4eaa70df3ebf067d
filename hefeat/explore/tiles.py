"""The pixels of a tile, read from its slide at the tiling's resolution."""

from __future__ import annotations

import numpy as np

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store


def tile_row(store: Store, slide_id: str, tile_id: int, *, tiling_id: str | None = None,
             extraction_id: str | None = None) -> dict:
    """Metadata of one tile (x, y, tiling size and mpp); picks the slide's only tiling if none is given."""
    if extraction_id:
        tiling_id = store.extraction(extraction_id)["tiling_id"]
    if tiling_id and store.tiles_path(tiling_id, slide_id).exists():  # one slide's file, not the whole view
        t = store.tiles(tiling_id, slide_id)
        rows = t[t["tile_id"] == int(tile_id)]
    else:
        q = "SELECT * FROM tiles WHERE slide_id = ? AND tile_id = ?" + (" AND tiling_id = ?" if tiling_id else "")
        rows = store.sql(q, [slide_id, int(tile_id)] + ([tiling_id] if tiling_id else []))
    if rows.empty:
        raise HefeatError(f"Tile {slide_id}:{tile_id} does not exist{' in tiling ' + tiling_id if tiling_id else ''}")
    if len(rows) > 1:
        raise HefeatError(f"Tile {slide_id}:{tile_id} exists in several tilings ({', '.join(rows['tiling_id'])}); pass --tiling")
    r = rows.iloc[0].to_dict()
    t = store.tiling(r["tiling_id"])
    r.update(size=int(t["size"]), mpp=float(t["mpp"]))
    return r


def tile_image(store: Store, slide_id: str, tile_id: int, **kw) -> np.ndarray:
    """RGB uint8 (size, size, 3) pixels of a tile."""
    from hefeat.slides.run import open_catalog_slide

    r = tile_row(store, slide_id, tile_id, **kw)
    row = store.slides([slide_id]).iloc[0]
    with open_catalog_slide(row, verify=False) as s:
        return s.read(r["x"], r["y"], r["size"], r["mpp"])
