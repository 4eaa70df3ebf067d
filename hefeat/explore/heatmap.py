"""Any per-tile value drawn over the slide's H&E at the tiles' true positions, on one tiling."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.explore.tiles import resolve_tiling
from hefeat.explore.values import Value, values_for
from hefeat.store.catalog import Store


def heatmap_values(store: Store, slide_id: str, value: str, *, tiling_id: str | None = None,
                   extraction_id: str | None = None) -> tuple[pd.DataFrame, Value]:
    """Rows (tile_id, x, y, size0, value) of a slide on its resolved tiling, and what the value is."""
    tid = resolve_tiling(store, slide_id, value=value, tiling_id=tiling_id, extraction_id=extraction_id)
    tiles = store.tiles(tid, slide_id)[["tile_id", "x", "y", "size0"]].reset_index(drop=True)
    vals, val = values_for(store, value, tiles.assign(slide_id=slide_id), tiling_id=tid)
    out = tiles.assign(value=vals.to_numpy())
    out.attrs.update(tiling_id=tid, column=val.column)
    return out, val


def render_heatmap(store: Store, slide_id: str, value: str, out: str | Path | None = None, *,
                   tiling_id: str | None = None, extraction_id: str | None = None, mpp: float = 4.0,
                   alpha: float = 0.7) -> dict:
    """PNG of the H&E next to the value drawn over it (legend or labelled colour bar, scale bar)."""
    from hefeat.figures.base import is_categorical
    from hefeat.figures.spatial import spot_map, tile_overlay
    from hefeat.slides.thumbnail import slide_image, spot_discs

    rows, val = heatmap_values(store, slide_id, value, tiling_id=tiling_id, extraction_id=extraction_id)
    img = slide_image(store, slide_id, mpp)
    tid = rows.attrs["tiling_id"]
    t = store.tiling(tid)
    n_val = int(rows["value"].notna().sum())
    what = "spots" if t.get("spots") else "tiles"
    title = (f"Slide {slide_id}: {val.label} on {n_val} of {len(rows)} {what} "
             f"({t.get('size')} px at {t.get('mpp')} µm/px, tiling {tid})")
    if t.get("spots") and not is_categorical(rows["value"]):  # spot patches overlap: draw the spots as discs
        c, d = spot_discs(rows)
        r = {**spot_map(img, c, d, {val.label: rows["value"].to_numpy(float)}, label=val.title, title=title, out=out),
             "kind": "continuous", "overlay": None}
    else:
        r = tile_overlay(img, rows, rows["value"], label=val.title, title=title, out=out, alpha=alpha)
    return {"slide_id": slide_id, "tiling_id": tid, "out": str(out) if isinstance(out, (str, Path)) else None,
            "tiles": len(rows), "with_value": n_val, "column": val.column, "label": val.title, "kind": r["kind"],
            "overlay": r["overlay"], "scale": img.scale}
