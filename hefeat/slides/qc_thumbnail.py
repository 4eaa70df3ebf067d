"""A QC picture per slide: the thumbnail, the tissue mask outline and the kept tiles."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.slides.reader import Slide
from hefeat.slides.tissue import TissueMask


def write_qc_thumbnail(slide: Slide, tissue: TissueMask | None, tiles: pd.DataFrame, out: str | Path) -> Path:
    """PNG of the slide thumbnail at the mask's resolution with the mask contour and tile squares."""
    from hefeat.figures.qc import qc_thumbnail

    mpp = tissue.mpp if tissue is not None else 8.0
    thumb = slide.thumbnail(mpp)
    scale = thumb.shape[1] / slide.dimensions[0]
    title = f"{slide.path.name}: {len(tiles)} tiles kept"
    if tissue is not None:
        title += f"; tissue {tissue.fraction:.0%} of the slide (saturation threshold {tissue.threshold:.3g})"
    qc_thumbnail(thumb, scale, slide.mpp.x, tiles, title=title, mask=None if tissue is None else tissue.mask, out=out)
    return Path(out)


def write_tiling_qc(store, tiling_id: str, slides: list[str] | None = None) -> dict:
    """Draw the QC picture of every tiled slide of an existing tiling (mask recomputed from its params).

    Returns {"tiling_id", "written": [paths], "failed": {slide_id: reason}}.
    """
    from hefeat.errors import HefeatError
    from hefeat.slides.reader import open_catalog_slide
    from hefeat.slides.tiling import TilingParams, slide_tissue

    meta = store.tiling(tiling_id)
    params = TilingParams.from_dict(meta["params"])
    done = store.sql("SELECT slide_id FROM status WHERE stage = 'tiling' AND id = ? AND state = 'ok' ORDER BY 1",
                     [tiling_id])["slide_id"].tolist()
    if slides:
        missing = sorted(set(slides) - set(done))
        if missing:
            raise HefeatError(f"Slides not tiled in tiling {tiling_id}: {', '.join(missing)}")
        done = [s for s in done if s in set(slides)]
    rows = store.slides(done).set_index("slide_id") if done else None
    out: dict = {"tiling_id": tiling_id, "written": [], "failed": {}}
    for sid in done:
        try:
            with open_catalog_slide(rows.loc[sid], verify=False) as slide:
                tissue = None if params.spots else slide_tissue(slide, params.for_slide(sid))
                path = write_qc_thumbnail(slide, tissue, store.tiles(tiling_id, sid), store.qc_thumbnail_path(tiling_id, sid))
            out["written"].append(str(path))
        except Exception as e:  # one unreadable slide does not stop the pictures of the others
            out["failed"][sid] = str(e) if isinstance(e, HefeatError) else f"{type(e).__name__}: {e}"
    return out
