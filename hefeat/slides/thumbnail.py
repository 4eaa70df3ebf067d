"""The H&E thumbnail of a catalogued slide, for drawing maps over it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.figures.spatial import SlideImage
from hefeat.store.catalog import Store


def slide_image(store: Store, slide_id: str, mpp: float = 4.0) -> SlideImage:
    """The slide's thumbnail at about `mpp` µm/px with its exact scale to level-0 pixels."""
    from hefeat.slides.reader import open_catalog_slide

    row = store.slides([slide_id]).iloc[0]
    with open_catalog_slide(row, verify=False) as s:
        thumb = s.thumbnail(mpp)
        return SlideImage(thumb, thumb.shape[1] / s.dimensions[0], float(s.mpp.x), slide_id)


def spot_discs(tiles: pd.DataFrame) -> tuple[np.ndarray, float]:
    """Centres (n, 2) of spot-centred tiles (x, y, size0) and a disc diameter that does not overlap neighbours."""
    c = tiles[["x", "y"]].to_numpy(float) + tiles[["size0"]].to_numpy(float) / 2
    size = float(tiles["size0"].median())
    if len(c) < 2:
        return c, size
    from scipy.spatial import cKDTree

    gaps = cKDTree(c).query(c, k=2)[0][:, 1]  # centre-to-centre distance to the nearest other spot
    return c, float(min(np.median(gaps) * 0.85, size))
