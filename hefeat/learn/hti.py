"""PathoMCH's heterogeneity index over binary trait maps (Levy-Jurgenson et al., Sci Rep 2020).

HTI = -sum_i p_i log_C p_i over the C = 2^T - 1 non-empty trait combinations, p_i = tiles positive
for exactly the traits of combination i / tiles positive for at least one trait. Tiles negative for
every trait do not count; a slide without positive tiles has HTI 0. HTI is in [0, 1].
"""

from __future__ import annotations

import numpy as np


def combination_codes(binary: np.ndarray) -> np.ndarray:
    """Bit code of each tile's positive traits (n_tiles,) from a (n_tiles, T) boolean matrix; 0 = none."""
    b = np.asarray(binary, bool)
    return (b * (1 << np.arange(b.shape[1]))).sum(1)


def hti(binary: np.ndarray) -> float:
    """Heterogeneity index of one slide from its (n_tiles, T) binary trait predictions."""
    b = np.asarray(binary, bool)
    if b.ndim != 2 or b.shape[1] < 1:
        raise ValueError("binary must be (n_tiles, n_traits)")
    T = b.shape[1]
    C = 2**T - 1
    codes = combination_codes(b)
    codes = codes[codes > 0]
    if len(codes) == 0 or C == 1:
        return 0.0
    p = np.bincount(codes, minlength=C + 1)[1:] / len(codes)
    p = p[p > 0]
    return float(abs(-(p * np.log(p)).sum() / np.log(C)))  # abs: a single combination gives -0.0
