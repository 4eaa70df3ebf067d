"""Any tile-level value drawn over the slide thumbnail at the tiles' true positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.explore.plots import is_categorical, pyplot
from hefeat.store.catalog import Store


def heatmap_values(store: Store, slide_id: str, value_sql: str, *, tiling_id: str | None = None) -> pd.DataFrame:
    """Rows (x, y, size0, value) for the slide from a query returning tile_id and one value column."""
    v = store.sql(value_sql)
    if "tile_id" not in v.columns:
        raise HefeatError("The --value query must return tile_id and one value column")
    if "slide_id" in v.columns:
        v = v[v["slide_id"] == slide_id]
    if v.empty:
        raise HefeatError(f"The --value query returned no rows for slide {slide_id}")
    tiling_id = tiling_id or (v["tiling_id"].iloc[0] if "tiling_id" in v.columns else None)
    if tiling_id is None:
        tl = store.sql("SELECT DISTINCT tiling_id FROM tiles WHERE slide_id = ?", [slide_id])["tiling_id"].tolist()
        if len(tl) != 1:
            raise HefeatError(f"Slide {slide_id} has {len(tl)} tilings; return tiling_id from the query or pass --tiling")
        tiling_id = tl[0]
    if "tiling_id" in v.columns:
        v = v[v["tiling_id"] == tiling_id]
    if v["tile_id"].duplicated().any():
        raise HefeatError("The --value query returns several rows per tile_id: filter it to one slide and tiling "
                          "(WHERE slide_id = ... AND tiling_id = ...) or return slide_id and tiling_id columns")
    vcols = [c for c in v.columns if c not in ("tile_id", "slide_id", "tiling_id", "x", "y", "model_id")]
    if not vcols:
        raise HefeatError("The --value query returns no value column besides ids")
    tiles = store.sql("SELECT tile_id, x, y, size0 FROM tiles WHERE tiling_id = ? AND slide_id = ?", [tiling_id, slide_id])
    out = tiles.merge(v[["tile_id", vcols[0]]].rename(columns={vcols[0]: "value"}), on="tile_id", how="inner")
    if out.empty:
        raise HefeatError(f"No tile id of the query exists in tiling {tiling_id} of slide {slide_id}")
    out.attrs["column"] = vcols[0]
    return out


def render_heatmap(store: Store, slide_id: str, value_sql: str, out: str | Path | None = None, *,
                   tiling_id: str | None = None, mpp: float = 4.0, alpha: float = 0.6, cmap: str = "magma") -> dict:
    """Draw values over the thumbnail (PNG with a colour bar). Returns the overlay array for checks."""
    from hefeat.slides.run import open_catalog_slide

    vals = heatmap_values(store, slide_id, value_sql, tiling_id=tiling_id)
    row = store.slides([slide_id]).iloc[0]
    with open_catalog_slide(row, verify=False) as s:
        thumb = s.thumbnail(mpp)
        scale = thumb.shape[1] / s.dimensions[0]
    overlay = np.full(thumb.shape[:2], np.nan)
    cat = is_categorical(vals["value"])
    codes = None
    if cat:
        codes = {v: i for i, v in enumerate(sorted(vals["value"].unique(), key=str))}
        values = vals["value"].map(codes).astype(float).to_numpy()
    else:
        values = pd.to_numeric(vals["value"]).to_numpy(float)
    for (x, y, s0), val in zip(vals[["x", "y", "size0"]].to_numpy(), values, strict=True):
        x0, y0 = int(round(x * scale)), int(round(y * scale))
        x1, y1 = max(x0 + 1, int(round((x + s0) * scale))), max(y0 + 1, int(round((y + s0) * scale)))
        overlay[y0:y1, x0:x1] = val
    plt = pyplot()
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(7, 7 * h / w + 0.5))
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(overlay), cmap="tab10" if cat else cmap, alpha=alpha, interpolation="nearest")
    if cat:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=im.cmap(im.norm(i)), label=str(k)) for k, i in codes.items()], fontsize=8)
    else:
        fig.colorbar(im, ax=ax, fraction=0.04, label=vals.attrs["column"])
    ax.set_axis_off()
    ax.set_title(f"{slide_id}: {vals.attrs['column']}")
    fig.tight_layout()
    if isinstance(out, (str, Path)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    if out is not None:
        fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return {"slide_id": slide_id, "out": str(out) if isinstance(out, (str, Path)) else None, "tiles": len(vals), "column": vals.attrs["column"],
            "overlay": overlay, "scale": scale}
