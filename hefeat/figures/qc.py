"""Tiling QC picture: the thumbnail, the tissue mask outline and the kept tiles, with a legend."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.figures.base import Out, pyplot, save, scale_bar

MASK = "#1e88e5"
TILE = "#43a047"


def qc_thumbnail(rgb: np.ndarray, scale: float, mpp0: float, tiles: pd.DataFrame, *, title: str,
                 mask: np.ndarray | None = None, out: Out = None) -> dict:
    """PNG of a slide thumbnail (`scale` thumbnail px per level-0 px) with mask outline and tile squares.

    tiles: x, y (level-0 top-left) and size0 of the kept tiles; mask: bool (h, w) at the thumbnail's
    resolution or None. The legend names both overlays; a scale bar gives physical size.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    plt = pyplot()
    h, w = rgb.shape[:2]
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * h / w + 0.8))
    ax.imshow(rgb)
    handles = []
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask, float), levels=[0.5], colors=[MASK], linewidths=0.9)
        handles.append(Line2D([], [], color=MASK, lw=1.2, label="tissue mask outline"))
    boxes = [Rectangle((x * scale, y * scale), s * scale, s * scale) for x, y, s in tiles[["x", "y", "size0"]].to_numpy()]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=TILE, linewidth=0.6))
    handles.append(Rectangle((0, 0), 1, 1, facecolor="none", edgecolor=TILE, label=f"kept tile ({len(tiles)})"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.01), ncol=2, frameon=False)
    scale_bar(ax, mpp0 / scale)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    save(fig, out)
    return {"tiles": len(tiles)}
