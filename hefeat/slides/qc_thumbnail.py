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
