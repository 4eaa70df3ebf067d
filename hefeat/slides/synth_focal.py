"""The synthetic cohort's focal slide label: a small region of distinct morphology at matched mean colour.

About half the slides (decided by the slide seed alone) are focal-positive: one disc of tissue,
FOCAL_SHARE of the slide's tissue (at least FOCAL_MIN_RADIUS_UM in radius, so a small test slide still
holds a few whole tiles of it), is re-rendered as a fine regular lattice of dark nuclei-like dots on a
paler ground. The lattice is zero-mean around a blur of the original tissue (and never clips), so every tile keeps its
mean colour: the region is told apart by texture only. Mean-pooling a slide dilutes it; an attention
model can find it. This is the case multiple-instance learning is for (Ilse et al. 2018).

Truth (truth.json, per slide): `focal` (0/1) and `focal_region` {cx_um, cy_um, r_um} in slide µm;
`focal_tiles` turns it into per-tile truth for any tiling.

`make_cohort(focal="hotspot")` draws the label another way, for the case where mean pooling must fail:
every slide carries small zero-mean "target" objects (a dark core in a pale surround) scattered over its
tissue at its own bulk density (uniform 0..HOTSPOT_BULK_MAX_PER_MM2, both classes), and a positive slide's
disc holds them at HOTSPOT_FOCAL_PER_MM2 (4x the densest bulk). A tile's features move with its object
count in one direction, so a bag's mean is confounded by the slide's bulk density; the label is in the
densest tiles, which attention can find (benchmarks/README.md, mil_focal.py). Truth adds
`focal_bulk_per_mm2` per slide.
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
FOCAL_KINDS = ("lattice", "hotspot")
# The hotspot label (measured on EfficientNet-Lite0 features, benchmarks/README.md): bulk 0..16 objects per
# 112 x 112 µm tile, 64 in the disc (48 gave ABMIL 0.844 on mil_focal.py); a difference-of-Gaussians object
# (core sd 2.5 µm, surround sd 5.5 µm, zero integral).
HOTSPOT_BULK_MAX_PER_MM2 = 1275.0
HOTSPOT_FOCAL_PER_MM2 = 5100.0
HOTSPOT_CORE_UM, HOTSPOT_SURROUND_UM, HOTSPOT_AMPLITUDE = 2.5, 5.5, 150.0


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


def hotspot_bulk(seed: int) -> float:
    """A slide's bulk density of target objects (per mm² of tissue), from its own random stream."""
    return float(np.random.default_rng([int(seed), 104_729]).uniform(0, HOTSPOT_BULK_MAX_PER_MM2))


def _jittered(rng: np.random.Generator, per_mm2: float, w_um: float, h_um: float) -> np.ndarray:
    """Points (x, y) µm at `per_mm2`: one uniform point per cell of a square grid (no Poisson count noise)."""
    if per_mm2 <= 0:
        return np.zeros((0, 2))
    c = 1e3 / np.sqrt(per_mm2)
    gx, gy = np.meshgrid(np.arange(0, w_um, c), np.arange(0, h_um, c))
    return np.c_[gx.ravel(), gy.ravel()] + rng.uniform(0, c, (gx.size, 2))


def hotspot_objects(seed: int, region: dict | None, tissue: np.ndarray, tissue_mpp: float, w_um: float,
                    h_um: float) -> np.ndarray:
    """Centres (x, y) µm of a slide's target objects: bulk density on its tissue, focal density in the disc."""
    rng = np.random.default_rng([int(seed), 104_759])

    def on_tissue(p):
        ty = np.clip((p[:, 1] / tissue_mpp).astype(int), 0, tissue.shape[0] - 1)
        tx = np.clip((p[:, 0] / tissue_mpp).astype(int), 0, tissue.shape[1] - 1)
        return tissue[ty, tx]

    def in_disc(p):
        if region is None:
            return np.zeros(len(p), bool)
        return (p[:, 0] - region["cx_um"]) ** 2 + (p[:, 1] - region["cy_um"]) ** 2 <= region["r_um"] ** 2

    bulk = _jittered(rng, hotspot_bulk(seed), w_um, h_um)
    bulk = bulk[on_tissue(bulk) & ~in_disc(bulk)]
    if region is None:
        return bulk
    foc = _jittered(rng, HOTSPOT_FOCAL_PER_MM2, w_um, h_um)
    return np.concatenate([bulk, foc[on_tissue(foc) & in_disc(foc)]])


def paint_hotspot(rgb: np.ndarray, seed: int, region: dict | None, mpp: float, tissue: np.ndarray,
                  tissue_mpp: float = 4.0) -> np.ndarray:
    """Stamp a slide's target objects (`hotspot_objects`) into the RGB image in place; mean colour is kept
    (each object integrates to zero; only the rare clip at 0/255 moves it)."""
    from scipy.signal import oaconvolve

    H, W = rgb.shape[:2]
    pts = hotspot_objects(seed, region, tissue, tissue_mpp, W * mpp, H * mpp)
    imp = np.zeros((H, W), np.float32)
    ix = np.clip((pts[:, 0] / mpp).astype(int), 0, W - 1)
    iy = np.clip((pts[:, 1] / mpp).astype(int), 0, H - 1)
    np.add.at(imp, (iy, ix), 1.0)
    s1, s2 = HOTSPOT_CORE_UM / mpp, HOTSPOT_SURROUND_UM / mpp
    r = int(np.ceil(3 * s2))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    d2 = xx**2 + yy**2
    k = np.exp(-d2 / (2 * s1**2)) - (s1**2 / s2**2) * np.exp(-d2 / (2 * s2**2))
    k -= k.mean()
    q = oaconvolve(imp, k, mode="same").astype(np.float32)
    out = rgb.astype(np.float32) - HOTSPOT_AMPLITUDE * q[..., None] * np.array([1.0, 1.15, 0.8], np.float32)
    rgb[:] = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return rgb
