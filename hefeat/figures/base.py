"""What every figure shares: the headless backend, saving, honest colour scales and scale bars."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

Out = str | os.PathLike | io.IOBase | None

DPI = 120
MISSING = "#bdbdbd"  # grey for "no value" everywhere


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Out) -> str | None:
    """Write `fig` as PNG to a path (atomically, folders created) or a file object; closes the figure."""
    plt = pyplot()
    try:
        if out is None:
            return None
        if isinstance(out, (str, os.PathLike)):
            from hefeat.store.atomic import atomic_path

            with atomic_path(out) as tmp:
                fig.savefig(tmp, dpi=DPI, format="png")
            return str(out)
        fig.savefig(out, dpi=DPI, format="png")
        return None
    finally:
        plt.close(fig)


def is_categorical(values) -> bool:
    """Non-numeric values, booleans, or at most 12 distinct integers are drawn as categories."""
    v = pd.Series(values)
    if pd.api.types.is_bool_dtype(v) or not pd.api.types.is_numeric_dtype(v):
        return True
    u = v.dropna().unique()
    return len(u) <= 12 and bool(np.allclose(u, np.round(u)))


@dataclass(frozen=True)
class Scale:
    """A colour range and how much of the data it clips (stated in the colour bar's label)."""

    vmin: float
    vmax: float
    clipped_low: float
    clipped_high: float

    @property
    def extend(self) -> str:
        """matplotlib colour-bar `extend` for the clipped ends."""
        lo, hi = self.clipped_low > 0, self.clipped_high > 0
        return "both" if lo and hi else "min" if lo else "max" if hi else "neither"

    @property
    def note(self) -> str:
        """'' or e.g. ' (2nd–98th percentile; 3 % of tiles beyond)' for labels."""
        clipped = self.clipped_low + self.clipped_high
        return f"; {clipped:.0%} of values beyond the ends" if clipped >= 0.005 else ""


def robust_scale(*arrays, lo: float = 2.0, hi: float = 98.0) -> Scale:
    """One colour range for all arrays (shared scale), from the lo-th to hi-th percentile of their values.

    Skewed values (sharpness, counts) would otherwise push most points into one end of the palette.
    """
    v = np.concatenate([np.asarray(a, float).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Scale(0.0, 1.0, 0.0, 0.0)
    a, b = np.percentile(v, [lo, hi])
    if not b > a:  # (nearly) constant values
        a, b = float(v.min()), float(v.max())
        if not b > a:
            a, b = a - 0.5, b + 0.5
    return Scale(float(a), float(b), float((v < a).mean()), float((v > b).mean()))


def desaturate(rgb: np.ndarray, keep: float = 0.25) -> np.ndarray:
    """The H&E thumbnail with most of its colour removed, so a colour overlay reads unambiguously."""
    x = rgb[..., :3].astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    out = keep * x + (1 - keep) * grey[..., None]
    return np.clip(out * 0.9 + 25, 0, 255).astype(np.uint8)  # a little lighter: overlays stay visible


def nice_length(target: float) -> float:
    """The 1/2/5 x 10^k value just below `target`."""
    if target <= 0:
        return 1.0
    k = 10 ** np.floor(np.log10(target))
    return float(max(m * k for m in (1, 2, 5) if m * k <= target))


def scale_bar(ax, um_per_px: float, *, color: str = "black") -> float:
    """Draw a scale bar about a fifth of the axes' width at the lower left; returns its length in µm."""
    x0, x1 = sorted(ax.get_xlim())
    y0, y1 = ax.get_ylim()
    width_px = x1 - x0
    length_um = nice_length(width_px * um_per_px / 5)
    length_px = length_um / um_per_px
    top, bottom = min(y0, y1), max(y0, y1)
    y = bottom - 0.05 * (bottom - top) if y0 > y1 else top + 0.05 * (bottom - top)  # image axes are inverted
    x = x0 + 0.04 * width_px
    ax.plot([x, x + length_px], [y, y], color=color, lw=3, solid_capstyle="butt")
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    ax.text(x + length_px / 2, y - 0.015 * (bottom - top) * (1 if y0 > y1 else -1), label, color=color,
            ha="center", va="bottom" if y0 > y1 else "top", fontsize=8)
    return length_um


def category_colors(n: int) -> list:
    """n distinguishable colours (tab10, then tab20); more categories are grouped by the caller."""
    plt = pyplot()
    base = list(plt.get_cmap("tab10").colors) if n <= 10 else list(plt.get_cmap("tab20").colors)
    return [base[i % len(base)] for i in range(n)]


def wrap(text: str, width: int = 100) -> str:
    """Wrap each line of a title or note to `width` characters."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) if line else "" for line in text.split("\n"))


def fmt(x: float) -> str:
    """A number with 3 significant digits (no '0.000' for small values)."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}"
