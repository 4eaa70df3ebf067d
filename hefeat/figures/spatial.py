"""Maps over the H&E: any tile value, spot expression (measured / predicted / baseline), trait maps.

Every map puts the slide's own H&E thumbnail next to the map and (desaturated) under it, states the
slide and what is drawn in its title, labels the colour bar with units, uses one colour scale for
panels that are compared, and carries a scale bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.figures.base import (
    MISSING,
    Out,
    Scale,
    category_colors,
    desaturate,
    is_categorical,
    pyplot,
    robust_scale,
    save,
    scale_bar,
    wrap,
)

MAX_CATEGORIES = 12


@dataclass(frozen=True)
class SlideImage:
    """An H&E thumbnail of a slide and how it maps to level-0 pixels."""

    rgb: np.ndarray  # (h, w, 3) uint8
    scale: float  # thumbnail pixels per level-0 pixel
    mpp0: float  # level-0 µm per pixel
    slide_id: str

    @property
    def um_per_px(self) -> float:
        """µm per thumbnail pixel."""
        return self.mpp0 / self.scale


def _crop(img: SlideImage, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> tuple[slice, slice]:
    """Thumbnail rows/cols around the drawn objects (level-0 boxes) with a 6 % margin."""
    h, w = img.rgb.shape[:2]
    if len(x0) == 0:
        return slice(0, h), slice(0, w)
    a, b = np.min(x0) * img.scale, np.max(x1) * img.scale
    c, d = np.min(y0) * img.scale, np.max(y1) * img.scale
    m = 0.06 * max(b - a, d - c, 10)
    return (slice(max(0, int(c - m)), min(h, int(np.ceil(d + m)))),
            slice(max(0, int(a - m)), min(w, int(np.ceil(b + m)))))


def _category_codes(values: pd.Series) -> tuple[np.ndarray, list[str], list[int]]:
    """Codes (NaN = missing) for the most frequent categories; the rest become 'other'."""
    v = values.astype("object").where(values.notna(), None)
    counts = v.dropna().astype(str).value_counts()
    keep = sorted(counts.index[: MAX_CATEGORIES - 1] if len(counts) > MAX_CATEGORIES else counts.index, key=str)
    names = list(keep) + (["other"] if len(counts) > len(keep) else [])
    lookup = {k: i for i, k in enumerate(keep)}
    codes = np.array([np.nan if x is None else lookup.get(str(x), len(keep)) for x in v], float)
    n = [int((codes == i).sum()) for i in range(len(names))]
    return codes, names, n


def _panel_image(ax, img: SlideImage, rows: slice, cols: slice, *, grey: bool) -> None:
    part = img.rgb[rows, cols]
    ax.imshow(desaturate(part) if grey else part, extent=(cols.start, cols.stop, rows.stop, rows.start))
    ax.set_axis_off()


def _figure(n_panels: int, rows: slice, cols: slice, *, width: float = 4.2, extra: float = 1.4, note: bool = False):
    plt = pyplot()
    h, w = rows.stop - rows.start, cols.stop - cols.start
    panel_h = min(width * h / max(w, 1), 7)
    return plt.subplots(1, n_panels, figsize=(width * n_panels + extra, panel_h + (1.5 if note else 1.0)), squeeze=False,
                        layout="constrained")


def _titles(fig, title: str, note: str = "") -> None:
    fig.suptitle(wrap(title, 30 * len(fig.axes) if len(fig.axes) > 2 else 80), fontsize=10)
    if note:
        fig.supxlabel(wrap(note, 40 * len(fig.axes)), fontsize=7, ha="center")


def tile_overlay(img: SlideImage, tiles: pd.DataFrame, values, *, label: str, title: str, out: Out = None,
                 categorical: bool | None = None, alpha: float = 0.7, cmap: str = "viridis",
                 scale: Scale | None = None) -> dict:
    """Any per-tile value over the H&E: the plain H&E, then the value over a desaturated H&E.

    tiles: DataFrame with x, y (level-0 top-left) and size0; values: one per tile (NaN = no value,
    drawn grey and counted, never a category). label: the value's name with its units.
    Returns the overlay raster (thumbnail pixels, NaN where no tile) for checks.
    """
    from matplotlib.patches import Patch

    vals = pd.Series(values).reset_index(drop=True)
    x0, y0 = tiles["x"].to_numpy(float), tiles["y"].to_numpy(float)
    s0 = tiles["size0"].to_numpy(float)
    cat = is_categorical(vals) if categorical is None else categorical
    names, counts = [], []
    if cat:
        code, names, counts = _category_codes(vals)
    else:
        code = pd.to_numeric(vals, errors="coerce").to_numpy(float)
    missing = np.isnan(code)
    overlay = np.full(img.rgb.shape[:2], np.nan)
    present = np.zeros(img.rgb.shape[:2], bool)
    sc = img.scale
    for x, y, s, v in zip(x0, y0, s0, code, strict=True):
        a, c = int(round(x * sc)), int(round(y * sc))
        b, d = max(a + 1, int(round((x + s) * sc))), max(c + 1, int(round((y + s) * sc)))
        overlay[c:d, a:b] = v
        present[c:d, a:b] = True
    rows, cols = _crop(img, x0, y0, x0 + s0, y0 + s0)
    fig, axes = _figure(2, rows, cols, extra=2.0)
    ax0, ax1 = axes[0]
    _panel_image(ax0, img, rows, cols, grey=False)
    ax0.set_title("H&E", fontsize=9)
    scale_bar(ax0, img.um_per_px)
    _panel_image(ax1, img, rows, cols, grey=True)
    ext = (0, overlay.shape[1], overlay.shape[0], 0)
    miss = np.ma.masked_where(~(present & np.isnan(overlay)), np.ones_like(overlay))
    from matplotlib.colors import BoundaryNorm, ListedColormap

    ax1.imshow(miss, cmap=ListedColormap([MISSING]), alpha=alpha, extent=ext, interpolation="nearest")
    if cat:
        colors = category_colors(len(names))
        cm = ListedColormap(colors)
        ax1.imshow(np.ma.masked_invalid(overlay), cmap=cm, norm=BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names)),
                   alpha=alpha, extent=ext, interpolation="nearest")
        handles = [Patch(color=colors[i], label=f"{n} ({counts[i]})") for i, n in enumerate(names)]
        if missing.any():
            handles.append(Patch(color=MISSING, label=f"no value ({int(missing.sum())})"))
        ax1.legend(handles=handles, fontsize=7, title=wrap(label, 30), title_fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.01, 1), frameon=False)
        used = None
    else:
        used = scale or robust_scale(code)
        im = ax1.imshow(np.ma.masked_invalid(overlay), cmap=cmap, vmin=used.vmin, vmax=used.vmax, alpha=alpha,
                        extent=ext, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.02, extend=used.extend)
        cb.set_label(wrap(label + used.note, 45), fontsize=8)
        if missing.any():
            ax1.legend(handles=[Patch(color=MISSING, label=f"no value ({int(missing.sum())} tiles)")], fontsize=7,
                       loc="lower right", frameon=True)
    ax1.set_xlim(cols.start, cols.stop)
    ax1.set_ylim(rows.stop, rows.start)
    ax1.set_title(wrap(label, 50), fontsize=9)
    _titles(fig, title)
    save(fig, out)
    return {"overlay": overlay, "kind": "categorical" if cat else "continuous", "tiles": len(vals),
            "missing": int(missing.sum()), "categories": names,
            "vmin": used.vmin if used else None, "vmax": used.vmax if used else None}


def spot_map(img: SlideImage, centres0: np.ndarray, diameter0: float, panels: dict[str, np.ndarray], *,
             label: str, title: str, out: Out = None, cmap: str = "viridis", note: str = "") -> dict:
    """Spot values as discs over the H&E, one panel per entry of `panels`, all on ONE colour scale.

    centres0: (n_spots, 2) level-0 x, y; diameter0: disc diameter in level-0 pixels; panels: name ->
    (n_spots,) values (e.g. measured, predicted, colour/texture baseline). label: value and units.
    """
    from matplotlib.collections import EllipseCollection

    c = np.asarray(centres0, float)
    half = diameter0 / 2
    rows, cols = _crop(img, c[:, 0] - half, c[:, 1] - half, c[:, 0] + half, c[:, 1] + half)
    used = robust_scale(*panels.values())
    fig, axes = _figure(len(panels) + 1, rows, cols, width=3.4, note=bool(note))
    axes = axes[0]
    _panel_image(axes[0], img, rows, cols, grey=False)
    axes[0].set_title("H&E", fontsize=9)
    scale_bar(axes[0], img.um_per_px)
    d = diameter0 * img.scale
    coll = None
    for ax, (name, v) in zip(axes[1:], panels.items(), strict=True):
        _panel_image(ax, img, rows, cols, grey=True)
        coll = EllipseCollection(np.full(len(c), d), np.full(len(c), d), np.zeros(len(c)), units="xy",
                                 offsets=c * img.scale, offset_transform=ax.transData, cmap=cmap,
                                 edgecolors="none", alpha=0.85)
        coll.set_array(np.asarray(v, float))
        coll.set_clim(used.vmin, used.vmax)
        ax.add_collection(coll)
        ax.set_xlim(cols.start, cols.stop)
        ax.set_ylim(rows.stop, rows.start)
        ax.set_title(name, fontsize=9)
    cb = fig.colorbar(coll, ax=list(axes[1:]), fraction=0.03, pad=0.02, extend=used.extend, shrink=0.9)
    cb.set_label(wrap(label + (" — one scale for all panels" if len(panels) > 1 else "") + used.note, 40), fontsize=8)
    _titles(fig, title, note)
    save(fig, out)
    return {"vmin": used.vmin, "vmax": used.vmax, "spots": len(c)}


def trait_maps(img: SlideImage, tiles: pd.DataFrame, traits: dict[str, np.ndarray], *, title: str,
               out: Out = None, note: str = "") -> dict:
    """Binary trait maps (PathoMCH cartography) over the H&E, then the combined map, each with a legend.

    traits: name -> (n_tiles,) bool "tile predicted high". The combined panel colours each tile by
    which traits it is high for. note: a footnote (e.g. how HTI is defined).
    """
    from matplotlib.patches import Patch

    names = list(traits)
    B = np.stack([np.asarray(traits[t], bool) for t in names], 1)
    codes = (B * (1 << np.arange(len(names)))).sum(1)
    x0, y0 = tiles["x"].to_numpy(float), tiles["y"].to_numpy(float)
    s0 = tiles["size0"].to_numpy(float)
    rows, cols = _crop(img, x0, y0, x0 + s0, y0 + s0)
    fig, axes = _figure(len(names) + 2, rows, cols, width=3.2, extra=2.2, note=bool(note))
    axes = axes[0]
    _panel_image(axes[0], img, rows, cols, grey=False)
    axes[0].set_title("H&E", fontsize=9)
    scale_bar(axes[0], img.um_per_px)
    sc = img.scale

    def draw(ax, colour_of: np.ndarray) -> None:
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Rectangle

        boxes = [Rectangle((x * sc, y * sc), s * sc, s * sc) for x, y, s in zip(x0, y0, s0, strict=True)]
        ax.add_collection(PatchCollection(boxes, facecolor=list(colour_of), edgecolor="none", alpha=0.65))
        ax.set_xlim(cols.start, cols.stop)
        ax.set_ylim(rows.stop, rows.start)

    high, low = "#c2185b", "#90caf9"
    for ax, k in zip(axes[1:-1], range(len(names)), strict=True):
        _panel_image(ax, img, rows, cols, grey=True)
        draw(ax, np.where(B[:, k], high, low))
        n_hi = int(B[:, k].sum())
        ax.set_title(f"{names[k]}: {n_hi / max(len(B), 1):.0%} of tiles high", fontsize=9)
        ax.legend(handles=[Patch(color=high, label=f"high ({n_hi})"), Patch(color=low, label=f"low ({len(B) - n_hi})")],
                  fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, frameon=False)
    # Colours and legend entries for the combinations present on the slide only: 2^T - 1 of them would repeat
    # the palette (11 traits: 2,047 entries, a legend taller than the figure) for combinations no tile has.
    present = [int(c) for c in np.unique(codes) if c]
    combo_colors = {0: "#e0e0e0", **dict(zip(present, category_colors(len(present)), strict=True))}
    _panel_image(axes[-1], img, rows, cols, grey=True)
    draw(axes[-1], np.array([combo_colors[c] for c in codes], dtype=object))
    labels = ["none high"] + ["+".join(t for k, t in enumerate(names) if c >> k & 1) + " high"
                              for c in range(1, 2 ** len(names))]
    shown = [0, *present]
    handles = [Patch(color=combo_colors[i], label=f"{labels[i]} ({int((codes == i).sum())})") for i in shown]
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    axes[-1].set_title("combined", fontsize=9)
    _titles(fig, title, note)
    save(fig, out)
    return {"tiles": len(B), "combinations": {labels[i]: int((codes == i).sum()) for i in range(len(labels))},
            "legend": [labels[i] for i in shown]}
