"""The synthetic cohort's focal slide label: a small region of distinct morphology at matched mean colour.

About half the slides (decided by the slide seed alone) are focal-positive: one disc of tissue,
FOCAL_SHARE of the slide's tissue (at least FOCAL_MIN_RADIUS_UM in radius, so a small test slide still
holds a few whole tiles of it), is re-rendered as a fine regular lattice of dark nuclei-like dots on a
paler ground. The lattice is zero-mean around a blur of the original tissue (and never clips), so every tile keeps its
mean colour: the region is told apart by texture only. Mean-pooling a slide dilutes it; an attention
model can find it. This is the case multiple-instance learning is for (Ilse et al. 2018).

Truth (truth.json, per slide): `focal` (0/1) and `focal_region` {cx_um, cy_um, r_um} in slide µm;
`focal_tiles` turns it into per-tile truth for any tiling.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Of the slide's tissue area. The acceptance asks that >= 70 % of a positive slide's top-decile attention
# tiles be truth tiles (>= half the tile in the disc): no ranking reaches that unless truth tiles are >= 7 %
# of the tissue tiles. At 0.04 a default 1.6 x 1.2 mm slide held 4 truth tiles among ~68 (top decile 7: a
# 50 % ceiling, which ABMIL on EfficientNet-Lite0 features reached exactly); 0.12 gives ~8 (ceiling ~95 %).
FOCAL_SHARE = 0.12
FOCAL_MIN_RADIUS_UM = 130.0
FOCAL_PERIOD_UM = 8.0  # lattice period of the focal texture
FOCAL_AMPLITUDE = 100.0  # grey levels from the ground to a dot's centre (before the headroom limit)
DOT_MEAN = 9 / 64  # mean of the dot profile ((1 + cos kx)(1 + cos ky) / 4)^2 over a period


def focal_region(seed: int, cls: np.ndarray, class_mpp: float) -> dict | None:
    """The focal disc {cx_um, cy_um, r_um, share} of a slide, or None for a focal-negative slide.

    Deterministic from the slide seed (its own random stream: no other draw of the slide changes);
    the centre is a tissue pixel whose whole disc is tissue when one exists.
    """
    rng = np.random.default_rng([int(seed), 104_723])
    if rng.random() >= 0.5:
        return None
    tissue = cls != 255
    if not tissue.any():
        return None
    area_um2 = float(tissue.sum()) * class_mpp**2
    r_um = max(float(np.sqrt(FOCAL_SHARE * area_um2 / np.pi)), FOCAL_MIN_RADIUS_UM)
    r_px = max(1, int(np.ceil(r_um / class_mpp)))
    inside = ndi.distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1] > r_px
    cand = np.flatnonzero(inside) if inside.any() else np.flatnonzero(tissue)
    cy, cx = np.unravel_index(int(rng.choice(cand)), cls.shape)
    share = min(1.0, np.pi * r_um**2 / area_um2)
    return {"cx_um": round((cx + 0.5) * class_mpp, 3), "cy_um": round((cy + 0.5) * class_mpp, 3),
            "r_um": round(r_um, 3), "share": round(share, 5)}


def paint_focal(rgb: np.ndarray, region: dict, mpp: float, tissue: np.ndarray | None = None,
                tissue_mpp: float = 4.0) -> np.ndarray:
    """Re-render the focal disc of an RGB slide image (µm/px `mpp`) in place: same local mean, new texture.

    `tissue` (a boolean map at `tissue_mpp`, e.g. the class map != background) keeps the texture off the
    glass where the disc reaches past the tissue.
    """
    H, W = rgb.shape[:2]
    cx, cy, r = region["cx_um"] / mpp, region["cy_um"] / mpp, region["r_um"] / mpp
    y0, y1 = max(0, int(cy - r - 2)), min(H, int(np.ceil(cy + r + 2)))
    x0, x1 = max(0, int(cx - r - 2)), min(W, int(np.ceil(cx + r + 2)))
    if y0 >= y1 or x0 >= x1:
        return rgb
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    alpha = np.clip(r - d + 0.5, 0, 1)[..., None]
    if tissue is not None:
        ty = np.clip(((yy[:, 0] + 0.5) * mpp / tissue_mpp).astype(int), 0, tissue.shape[0] - 1)
        tx = np.clip(((xx[0] + 0.5) * mpp / tissue_mpp).astype(int), 0, tissue.shape[1] - 1)
        alpha = alpha * tissue[np.ix_(ty, tx)][..., None]
    win = rgb[y0:y1, x0:x1].astype(np.float32)
    base = ndi.gaussian_filter(win, (6.0 / mpp, 6.0 / mpp, 0))  # the tissue's local mean colour
    k = 2 * np.pi * mpp / FOCAL_PERIOD_UM
    # A lattice of dark dots on a paler ground: q peaks at 1 on each dot, and its mean over a period is
    # exactly DOT_MEAN, so base - a (q - DOT_MEAN) keeps the local mean colour. a is limited to the headroom
    # of the (slowly varying) base colour, so nothing clips (clipping shifts the mean).
    q = (((1 + np.cos(k * xx)) / 2) * ((1 + np.cos(k * yy)) / 2)) ** 2
    up = np.maximum(255 - base, 0) / DOT_MEAN
    down = np.maximum(base, 0) / (1 - DOT_MEAN)
    amp = np.minimum(FOCAL_AMPLITUDE * np.array([1.0, 1.15, 0.8], np.float32), np.minimum(up, down))
    new = base - amp * (q - DOT_MEAN)[..., None]
    out = win * (1 - alpha) + new * alpha
    rgb[y0:y1, x0:x1] = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return rgb


def focal_tiles(region: dict | None, x: np.ndarray, y: np.ndarray, size0: np.ndarray | float,
                slide_mpp: float, *, min_overlap: float = 0.5) -> np.ndarray:
    """Per-tile truth: whether at least `min_overlap` of each tile (level-0 x, y, side size0) lies in the disc."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if region is None or len(x) == 0:
        return np.zeros(len(x), bool)
    s = np.broadcast_to(np.asarray(size0, np.float64), x.shape)
    g = (np.arange(8) + 0.5) / 8
    px = (x[:, None, None] + s[:, None, None] * g[None, None, :]) * slide_mpp
    py = (y[:, None, None] + s[:, None, None] * g[None, :, None]) * slide_mpp
    inside = (px - region["cx_um"]) ** 2 + (py - region["cy_um"]) ** 2 <= region["r_um"] ** 2
    return inside.mean((1, 2)) >= min_overlap
