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

from hefeat.formats.spot_model import MORPHOLOGY, morphology_of

__all__ = ["MORPHOLOGY", "MORPHOLOGY_GENES", "MORPHOLOGY_MU", "gland_field", "gland_nuclei", "glandular_fraction",
           "morphology_of"]

# Glandular differentiation markers (intestinal-type epithelium) rise with gland formation; vimentin falls.
MORPHOLOGY_GENES = {"CDX2": 3.0, "KRT20": 3.0, "CDH17": 2.5, "VIL1": 2.5, "VIM": -3.0}
# log2 baselines: vimentin's is 4x each marker's, so the pool's spot share can stay constant (hefeat.formats.spot_model.morphology_shares)
MORPHOLOGY_MU = {"CDX2": 8.0, "KRT20": 8.0, "CDH17": 8.0, "VIL1": 8.0, "VIM": 10.0}
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

