"""The synthetic cohort's morphology programme: glandular vs solid tumour at matched colour and texture.

Every other synthetic signal is carried by tissue composition, which stain colour alone reveals. This one
is not: part of each slide's tumour is rendered *glandular* (its nuclei lined up on rings, as the
epithelium of a gland or tubule) and the rest *solid* (the same nuclei scattered at random). Both use the
same nuclei (count per area, size, shape, shade) on the same ground, so mean colour, stain density,
background share and Laplacian sharpness agree to within noise (tests/test_synth_morphology.py checks it);
only the arrangement differs. Gland formation is a morphological grade criterion (the tubule score of
Elston & Ellis 1991) that a pathologist reads from architecture, not from colour.

The slide's glandular share of tumour is drawn uniformly and independently of its composition, and the
morphology genes follow `gland_index` = glandular share − solid share of the tissue (of the slide, or of a
spot). Its covariance with the tumour share is zero by construction, so a colour/texture baseline cannot
predict it, while an encoder that sees architecture can.

Truth: `morphology`, `morph_weights` and `morphology_genes` in truth.json; per slide `morphology`
{gland_index, gland_share}; per spot `frac_glandular` in truth/spots.parquet; per tile via
`glandular_fraction` on the class and gland maps (truth/<slide>.classes.npz).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MORPHOLOGY = ("gland_index",)
# Glandular differentiation markers (intestinal-type epithelium) rise with gland formation; vimentin falls.
MORPHOLOGY_GENES = {"CDX2": 3.0, "KRT20": 3.0, "CDH17": 2.5, "VIL1": 2.5, "VIM": -3.0}
# log2 baselines: vimentin's is 4x each marker's, so the pool's spot share can stay constant (morphology_shares)
MORPHOLOGY_MU = {"CDX2": 8.0, "KRT20": 8.0, "CDH17": 8.0, "VIL1": 8.0, "VIM": 10.0}
SPOT_AMPLITUDE = 0.9
GLAND_SPACING_UM = 43.5  # 8 ring nuclei per 43.5² µm²: colour and sharpness of the random nuclei (measured)
GLAND_NUCLEI = 8
GLAND_RADIUS_UM = (10.5, 13.5)


def gland_field(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """A smooth field on the class map (> 0 = glandular where tumour) and the slide's glandular share.

    Drawn from its own stream of the slide seed, so no other draw of the slide changes.
    """
    rng = np.random.default_rng([int(seed), 7_919])
    share = float(rng.uniform(0.0, 1.0))
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), rng.uniform(10, 25), mode="wrap")
    return (f - np.quantile(f, 1.0 - share)).astype(np.float32), share


def morphology_of(cls: np.ndarray, gland: np.ndarray) -> dict[str, float]:
    """gland_index and glandular share of tumour of a window of the class map (255 = background)."""
    tissue = cls != 255
    n = max(int(tissue.sum()), 1)
    tum = cls == 0
    g = (tum & gland).sum() / n
    s = (tum & ~gland).sum() / n
    return {"gland_index": float(g - s), "gland_share": float((tum & gland).sum() / max(int(tum.sum()), 1))}


def gland_nuclei(seed: int, width_um: float, height_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y, µm), size scale and shade of the ring nuclei of a slide's glands (all candidates).

    The caller keeps those that fall on glandular tumour; the solid tumour's random nuclei are dropped
    there, so the count per area stays the same.
    """
    rng = np.random.default_rng([int(seed), 7_927])
    gx = np.arange(GLAND_SPACING_UM / 2, width_um, GLAND_SPACING_UM)
    gy = np.arange(GLAND_SPACING_UM / 2, height_um, GLAND_SPACING_UM)
    cx, cy = (a.ravel() for a in np.meshgrid(gx, gy))
    n = len(cx)
    cx = cx + rng.uniform(-3, 3, n)
    cy = cy + rng.uniform(-3, 3, n)
    r = rng.uniform(*GLAND_RADIUS_UM, n)
    theta = rng.uniform(0, 2 * np.pi, n)[:, None] + 2 * np.pi * np.arange(GLAND_NUCLEI)[None] / GLAND_NUCLEI
    theta = theta + rng.normal(0, 0.08, theta.shape)
    x = (cx[:, None] + r[:, None] * np.cos(theta)).ravel()
    y = (cy[:, None] + r[:, None] * np.sin(theta)).ravel()
    return x, y, rng.uniform(0.55, 1.45, x.size), rng.uniform(0.8, 1.15, x.size)


def glandular_fraction(cls: np.ndarray, gland: np.ndarray, class_mpp: float, x: np.ndarray, y: np.ndarray,
                       size0: np.ndarray | float, slide_mpp: float) -> np.ndarray:
    """Per-tile truth: gland_index of each tile (level-0 x, y, side size0) from the class and gland maps."""
    s = np.broadcast_to(np.asarray(size0, np.float64), np.shape(x))
    out = np.zeros(len(x))
    for i, (x0, y0, si) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), s, strict=True)):
        a, b = int(y0 * slide_mpp / class_mpp), int(np.ceil((y0 + si) * slide_mpp / class_mpp))
        c, d = int(x0 * slide_mpp / class_mpp), int(np.ceil((x0 + si) * slide_mpp / class_mpp))
        out[i] = morphology_of(cls[a:b, c:d], gland[a:b, c:d])["gland_index"]
    return out


def morphology_shares(base: np.ndarray, M: np.ndarray, morph: np.ndarray) -> np.ndarray:
    """Spot shares of the morphology genes: base · (1 + a · morphology), their sum independent of morphology.

    a = SPOT_AMPLITUDE · sign(M), the falling genes' a scaled so that Σ base · a = 0. A spot's counts are
    normalised by its total (ST-Net's target), so a pool whose mass moved with morphology would put a
    morphology term into every other gene; a constant pool keeps the composition genes free of it.
    """
    a = SPOT_AMPLITUDE * np.sign(M)
    up, down = (base[:, None] * np.clip(a, 0, None)).sum(0), (base[:, None] * np.clip(-a, 0, None)).sum(0)
    a = np.where(a < 0, a * up / np.where(down > 0, down, 1), a)
    if np.abs(a).max(initial=0) >= 1:
        raise ValueError("morphology gene baselines cannot balance the pool (a share would turn negative)")
    return base * (1.0 + a @ morph)
