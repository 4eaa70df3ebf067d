"""The H&E thumbnail of a catalogued slide, for drawing maps over it."""

from __future__ import annotations

from hefeat.figures.spatial import SlideImage
from hefeat.store.catalog import Store


def slide_image(store: Store, slide_id: str, mpp: float = 4.0) -> SlideImage:
    """The slide's thumbnail at about `mpp` µm/px with its exact scale to level-0 pixels."""
    from hefeat.slides.run import open_catalog_slide

    row = store.slides([slide_id]).iloc[0]
    with open_catalog_slide(row, verify=False) as s:
        thumb = s.thumbnail(mpp)
        return SlideImage(thumb, thumb.shape[1] / s.dimensions[0], float(s.mpp.x), slide_id)
