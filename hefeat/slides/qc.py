"""Per-tile quality measures and the papers' background rules."""

from __future__ import annotations

import numpy as np


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (blurred tiles score low)."""
    # scipy here, not at module level: ~0.3 s that an extraction (it imports this module) does not pay
    from scipy import ndimage as ndi

    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndi.laplace(gray).var())


def mean_rgb(rgb: np.ndarray) -> tuple[float, float, float]:
    """Mean R, G and B of a tile."""
    m = rgb.reshape(-1, 3).mean(axis=0)
    return float(m[0]), float(m[1]), float(m[2])


def background_share(rgb: np.ndarray, level: float = 220.0) -> float:
    """Share of pixels whose mean RGB is above `level` (white background; HE2RNA/PathoMCH rule)."""
    return float((rgb.mean(axis=2) > level).mean())


def tissue_density(rgb: np.ndarray, level: int = 200) -> float:
    """Share of pixels with R, G and B all below `level` (Ektefaie et al.'s tissue pixel)."""
    return float((rgb < level).all(axis=2).mean())


def tile_qc(rgb: np.ndarray, *, rgb_background: float = 220.0, density_level: int = 200) -> dict[str, float]:
    """All QC columns of one RGB tile (h, w, 3) uint8."""
    r, g, b = mean_rgb(rgb)
    return {
        "sharpness": sharpness(rgb),
        "mean_r": r,
        "mean_g": g,
        "mean_b": b,
        "background_frac": background_share(rgb, rgb_background),
        "density": tissue_density(rgb, density_level),
    }
