"""Tissue detection: Otsu on the saturation of a low-resolution thumbnail, then cleanup.

Otsu (1979) always splits a histogram in two, so on an image that is all tissue it splits tissue
from tissue. Glass is unsaturated; so when the class Otsu would call background is itself clearly
stained and the split is weak (Otsu's separability eta = between-class / total variance below
UNIMODAL_ETA), there is no background mode: every stained pixel is tissue. When the slide holds glass,
pale tissue and dark tissue, Otsu's cut falls between the two tissues; a second Otsu cut inside the
lower class that cleanly splits glass from a stained mode is used instead (`glass_cut`). The cut is set on the
pixels' own saturation; a pixel is tissue when its own saturation or that of its neighbourhood's mean colour
(TEXTURE_UM) is above it, so textured tissue whose ground is paler than the cut is not lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy.ndimage is imported in the functions that use it: ~0.3 s that an extraction, which imports this
# module through hefeat.slides.tiling without detecting tissue, does not pay.

# Below this saturation nothing is tissue, whatever Otsu says (a blank slide has only noise).
MIN_SATURATION = 0.07
# A histogram is called unimodal (no glass) when Otsu's separability is below this and the
# lower class has a median saturation above STAINED_SATURATION (glass measures < 0.05).
UNIMODAL_ETA = 0.8
STAINED_SATURATION = 0.1
# Glass, pale tissue (necrosis, mucin, loose stroma) and dark tissue make three modes; Otsu's one cut then
# falls between the two tissues and drops the pale one. A second cut inside the lower class is taken when
# it cleanly splits glass (median below GLASS_SATURATION) from a stained mode of at least PALE_MIN_SHARE
# of the usable pixels.
GLASS_SATURATION = 0.05
PALE_MIN_SHARE = 0.05
# A pixel is also tissue when the saturation of its neighbourhood's mean colour (a Gaussian of this sd in µm) is
# above the cut: at the mask's 8 µm/px a textured tissue (dense dark nuclei on a ground paler than the cut) puts
# most of its pixels below the cut though its colour is tissue, and the cleanup then drops the whole region as a
# hole (the synthetic hotspot cohort's S28 lost its focal disc this way).
TEXTURE_UM = 8.0


@dataclass(frozen=True)
class TissueMask:
    """Boolean mask of shape (h, w) over the slide, `mpp` µm per mask pixel, and the threshold used."""

    mask: np.ndarray
    mpp: float
    threshold: float
    unimodal: bool = False  # no background mode found: all stained pixels are tissue

    @property
    def fraction(self) -> float:
        """Share of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image (h, w, 3)."""
    rgb = rgb.astype(np.float32)
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on values in [0, 1] (maximises between-class variance)."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    # Every cut inside an empty gap scores the same; take the middle of that plateau.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(round(best.mean())) + 1])


def separability(values: np.ndarray, threshold: float) -> float:
    """Otsu's eta: between-class variance / total variance when `values` are split at `threshold` (0..1)."""
    v = values.ravel().astype(np.float64)
    lo, hi = v[v <= threshold], v[v > threshold]
    if not lo.size or not hi.size or v.var() == 0:
        return 0.0
    w0, w1 = lo.size / v.size, hi.size / v.size
    return float(w0 * w1 * (lo.mean() - hi.mean()) ** 2 / v.var())


def is_unimodal(values: np.ndarray, threshold: float) -> bool:
    """True when the Otsu split at `threshold` separates stained tissue from stained tissue (no glass)."""
    lo = values[values <= threshold]
    return bool(lo.size and np.median(lo) > STAINED_SATURATION and separability(values, threshold) < UNIMODAL_ETA)


def glass_cut(values: np.ndarray, threshold: float) -> float | None:
    """The cut between glass and pale tissue when the Otsu split at `threshold` left pale tissue with the glass.

    None when the lower class is not itself a clean (eta >= UNIMODAL_ETA) split of glass from a stained mode
    holding PALE_MIN_SHARE of the pixels: glass alone is one noisy mode (a Gaussian's best Otsu eta is 2/pi).
    """
    v = values.ravel()
    lo = v[v <= threshold]
    if lo.size < 16:
        return None
    t2 = otsu_threshold(lo)
    glass, pale = lo[lo <= t2], lo[lo > t2]
    if not glass.size or pale.size < PALE_MIN_SHARE * v.size or separability(lo, t2) < UNIMODAL_ETA:
        return None
    if np.median(glass) >= GLASS_SATURATION or np.median(pale) <= MIN_SATURATION:
        return None
    return t2


def clean_mask(mask: np.ndarray, *, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Drop connected components smaller than `min_object_px` and fill holes smaller than `max_hole_px`."""
    from scipy import ndimage as ndi

    mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool))
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_object_px
        keep[0] = False
        mask = keep[lab]
    holes_lab, nh = ndi.label(~mask)
    if nh:
        sizes = np.bincount(holes_lab.ravel())
        border = np.unique(np.concatenate([holes_lab[0], holes_lab[-1], holes_lab[:, 0], holes_lab[:, -1]]))
        fill = sizes < max_hole_px
        fill[0] = False
        fill[border] = False  # background touching the border is not a hole
        mask = mask | fill[holes_lab]
    return mask


def detect_tissue(
    thumb: np.ndarray,
    mpp: float,
    *,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> TissueMask:
    """Tissue mask of an RGB thumbnail (h, w, 3) taken at `mpp` µm/px."""
    from scipy import ndimage as ndi

    sat = saturation(thumb)
    # Near-white and near-black pixels (background, pen, scanner edges) never set the threshold.
    gray = thumb.mean(axis=2)
    usable = sat[(gray > 20) & (gray < 250)]
    thr = otsu_threshold(usable) if usable.size > 16 else 1.0
    unimodal = usable.size > 16 and is_unimodal(usable, thr)
    if usable.size > 16 and not unimodal:
        cut = glass_cut(usable, thr)
        thr = thr if cut is None else cut
    thr = MIN_SATURATION if unimodal else max(thr, MIN_SATURATION)
    # The cut comes from the pixels' own saturation (above); a pixel passes on its own or on its neighbourhood's colour.
    sigma = TEXTURE_UM / mpp
    local = ndi.gaussian_filter(thumb.astype(np.float32), (sigma, sigma, 0), mode="nearest")
    mask = ((saturation(local) > thr) | (sat > thr)) & (gray > 20)
    px_area = mpp * mpp
    # An object cannot be required to be larger than a tenth of the image (small ROIs, crops).
    min_object_um2 = min(min_object_um2, 0.1 * mask.size * px_area)
    mask = clean_mask(
        mask,
        min_object_px=max(1, int(min_object_um2 / px_area)),
        max_hole_px=max(1, int(max_hole_um2 / px_area)),
    )
    return TissueMask(mask=mask, mpp=mpp, threshold=thr, unimodal=bool(unimodal))
