"""Pillow's resize as two matrix products, so tiles resized on a device equal the CPU reader's.

The CPU reader (`Slide.read`) resizes with Pillow: Lanczos-3 to shrink, bilinear to enlarge. Pillow's resample
is separable: each output pixel is a weighted sum of the input pixels within the filter's support (stretched by
the scale factor when shrinking), its weights normalised to sum to one and rounded to 22-bit fixed point; the
horizontal pass runs first and is rounded to uint8 before the vertical one (Pillow, libImaging/Resample.c:
`precompute_coeffs`, `normalize_coeffs_8bpc`). Those weights as an (out, in) matrix per axis make the same resize
a pair of batched matrix products on the GPU. Sums in float32 (not Pillow's integers) can land on the other side
of a rounding step: a pixel then differs by one level, in about 1 of 50,000 (tests/test_resample.py); so float32
runs only where it is needed and enough (`product_dtype`): shrinking on a GPU (float64 GEMMs are slow on most GPUs)
where TF32 is not allowed for matrix products. On the CPU, when enlarging (weights with small denominators put many
sums exactly on a rounding step) and under TF32 the products are float64, where Pillow's fixed-point sums are exact:
the result is Pillow's, byte for byte.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


FILTERS = {"lanczos": (_lanczos, 3.0), "bilinear": (_bilinear, 1.0)}


def reader_filter(n_in: int, n_out: int) -> str:
    """The filter `Slide.read` resizes an n_in px region to n_out px with: Lanczos to shrink, bilinear to enlarge."""
    return "lanczos" if n_in > n_out else "bilinear"


@lru_cache(maxsize=64)
def weights(n_in: int, n_out: int, kind: str) -> np.ndarray:
    """(n_out, n_in) float64 matrix of Pillow's fixed-point resample weights for one axis (read-only)."""
    filt, support = FILTERS[kind]
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support *= filterscale
    W = np.zeros((n_out, n_in))
    one = 1 << PRECISION_BITS
    for j in range(n_out):
        center = (j + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        k = np.array([filt((x - center + 0.5) / filterscale) for x in range(lo, hi)])
        if k.sum() != 0.0:
            k = k / k.sum()
        W[j, lo:hi] = np.trunc(k * one + np.where(k < 0, -0.5, 0.5)) / one  # C's (int) cast: toward zero
    W.setflags(write=False)
    return W


def product_dtype(device_type: str, shrinking: bool, tf32: bool):
    """float32 to shrink on a GPU, else float64 (module docstring). With TF32 allowed (a user's global switch) float32
    GEMMs round the pixels to TF32's 10-bit mantissa: several levels off."""
    import torch

    return torch.float32 if device_type == "cuda" and shrinking and not tf32 else torch.float64


@lru_cache(maxsize=16)
def _device_weights(n_in: int, n_out: int, device: str, dtype):
    """`weights` for the reader's filter as a tensor on `device`, uploaded once (resize runs every batch)."""
    import torch

    return torch.tensor(weights(n_in, n_out, reader_filter(n_in, n_out)), dtype=dtype, device=device)


def resize(img, size_px: int, dtype=None):
    """uint8 (B, n, n, 3) torch tensor -> uint8 (B, size_px, size_px, 3) on its device, resized as `Slide.read` does
    (Pillow's Lanczos to shrink, bilinear to enlarge): horizontal pass, rounded to uint8, then vertical. `dtype` of
    the products: by default float32 to shrink on a GPU, else float64 (see the module docstring)."""
    import torch

    n = img.shape[1]
    if n == size_px:
        return img
    dt = dtype or product_dtype(img.device.type, n > size_px, torch.backends.cuda.matmul.allow_tf32)
    W = _device_weights(n, size_px, str(img.device), dt)
    x = img.permute(0, 3, 1, 2).to(dt)  # (B, 3, n, n)
    x = torch.floor(torch.matmul(x, W.T) + 0.5).clamp_(0, 255)  # rows resized: (B, 3, n, size)
    x = torch.floor(torch.matmul(W, x) + 0.5).clamp_(0, 255)  # then columns: (B, 3, size, size)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
