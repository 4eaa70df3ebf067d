"""A QC picture per slide: the thumbnail, the tissue mask outline and the kept tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.slides.reader import Slide
from hefeat.slides.tissue import TissueMask


def write_qc_thumbnail(slide: Slide, tissue: TissueMask | None, tiles: pd.DataFrame, out: str | Path) -> Path:
    """PNG of the slide thumbnail at the mask's resolution with the mask contour and tile squares."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from hefeat.explore.plots import pyplot

    mpp = tissue.mpp if tissue is not None else 8.0
    thumb = slide.thumbnail(mpp)
    scale = thumb.shape[1] / slide.dimensions[0]
    plt = pyplot()
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.4))
    ax.imshow(thumb)
    if tissue is not None and tissue.mask.any():
        ax.contour(np.asarray(tissue.mask, float), levels=[0.5], colors=["#1e88e5"], linewidths=0.8)
    boxes = [Rectangle((x * scale, y * scale), s * scale, s * scale) for x, y, s in tiles[["x", "y", "size0"]].to_numpy()]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#43a047", linewidth=0.5))
    ax.set_title(f"{len(tiles)} tiles" + (f", tissue {tissue.fraction:.0%}" if tissue is not None else ""))
    ax.set_axis_off()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    from hefeat.store.atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out)
