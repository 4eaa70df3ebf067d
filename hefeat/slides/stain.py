"""Stain normalisation on the device (torch, batched): Macenko and Reinhard.

- Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009:
  optical density (OD) of tissue pixels; the plane of its two main eigenvectors; the stain vectors
  are the directions at the alpha and 100 - alpha percentiles of the angle in that plane
  (hematoxylin = the one with the larger red OD); concentrations by least squares; each stain's
  99th-percentile concentration is scaled to the reference's and the image rebuilt with the
  reference stain matrix.
- Reinhard et al., "Color transfer between images", IEEE CG&A 2001: per-channel mean and standard
  deviation matched in the decorrelated l-alpha-beta space.

A reference is fitted once (to one image, or to a sample of tiles from the cohort) and becomes part
of the extraction's id and provenance. Each tile is normalised from its own statistics, so a
tile's pixels never depend on which other tiles share its batch. We wrote this rather than use
torchstain: torchstain 1.4 normalises one CHW image per call (a Python loop per tile), gathers
Reinhard statistics with `torch.tensor([...])` (host round-trips, CPU tensors on a GPU), and has no
guard for tiles without tissue (an empty covariance).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hefeat.errors import HefeatError

METHODS = ("macenko", "reinhard")
IO = 240.0  # transmitted light intensity (Macenko 2009)
BETA = 0.15  # OD below this in any channel = background / transparent
ALPHA = 1.0  # percentile of the angle distribution (robust extremes)
MIN_TISSUE_SHARE = 0.01  # tiles with fewer stained pixels pass through unchanged
# Ruifrok & Johnston 2001 H and E OD vectors: the stain matrix used where an estimate is impossible.
RUIFROK_HE = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105))
# RGB -> LMS (Reinhard et al. 2001, eq. 4) and log-LMS -> l-alpha-beta (eq. 6).
_RGB2LMS = ((0.3811, 0.5783, 0.0402), (0.1967, 0.7244, 0.0782), (0.0241, 0.1288, 0.8444))
_LMS2LAB = ((1 / 3**0.5, 1 / 3**0.5, 1 / 3**0.5), (1 / 6**0.5, 1 / 6**0.5, -2 / 6**0.5), (1 / 2**0.5, -1 / 2**0.5, 0.0))


@dataclass(frozen=True)
class StainReference:
    """A fitted target: method, its numbers, and what it was fitted to."""

    method: str
    values: dict  # macenko: stain_matrix [[H], [E]] (unit OD vectors), max_conc [2]; reinhard: mean [3], std [3]
    source: str

    def to_dict(self) -> dict:
        """Plain-dict form (provenance; part of the extraction id)."""
        return {"method": self.method, "values": self.values, "source": self.source}

    @property
    def digest(self) -> str:
        """Short hash of the method and its numbers."""
        blob = json.dumps({"m": self.method, "v": self.values}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def normalizer(self):
        """The torch callable applying this reference to float NCHW batches in 0..255."""
        return MacenkoNormalizer(self) if self.method == "macenko" else ReinhardNormalizer(self)

    @classmethod
    def from_dict(cls, d: dict) -> StainReference:
        """Back from `to_dict()`."""
        return cls(d["method"], d["values"], d.get("source", ""))


# ----------------------------------------------------------------------------------------------
# Batched helpers
# ----------------------------------------------------------------------------------------------
def _flat(x):
    """(B, 3, H, W) -> (B, N, 3)."""
    return x.flatten(2).transpose(1, 2)


def optical_density(x):
    """OD = -log((I + 1) / Io) of float RGB values in 0..255 (any shape, channels last or not)."""
    import torch

    return -torch.log((x + 1.0) / IO)


def masked_quantile(v, mask, q: float):
    """q-quantile (0..1, nearest rank) along the last axis of `v` (B, N) over entries where `mask`."""
    import torch

    n = mask.sum(-1)
    filled = torch.where(mask, v, torch.full_like(v, float("inf")))
    s, _ = torch.sort(filled, dim=-1)
    k = torch.clamp(torch.round(q * (n - 1).clamp_min(0)).long(), 0, v.shape[-1] - 1)
    return s.gather(-1, k.unsqueeze(-1)).squeeze(-1)


def estimate_stains(od, mask):
    """Macenko stain matrices (B, 3, 2) [H, E columns, unit length] and a validity flag (B,) from OD (B, N, 3).

    `mask` (B, N) marks tissue pixels. Tiles with too few of them get Ruifrok & Johnston's matrix and valid=False.
    """
    import torch

    m = mask.to(od.dtype).unsqueeze(-1)
    n = m.sum(1).clamp_min(1.0)  # (B, 1)
    mean = (od * m).sum(1) / n
    d = (od - mean.unsqueeze(1)) * m
    cov = d.transpose(1, 2) @ d / (n - 1).clamp_min(1.0).unsqueeze(-1)
    cov = cov + 1e-9 * torch.eye(3, dtype=od.dtype, device=od.device)  # keeps eigh defined on empty tiles
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[..., 1:]  # (B, 3, 2): the two largest
    plane = plane * torch.where(plane.sum(1, keepdim=True) < 0, -1.0, 1.0)  # point into positive OD
    t = od @ plane  # (B, N, 2)
    phi = torch.atan2(t[..., 1], t[..., 0])
    lo = masked_quantile(phi, mask, ALPHA / 100)
    hi = masked_quantile(phi, mask, 1 - ALPHA / 100)
    v_lo = (plane @ torch.stack([torch.cos(lo), torch.sin(lo)], -1).unsqueeze(-1)).squeeze(-1)
    v_hi = (plane @ torch.stack([torch.cos(hi), torch.sin(hi)], -1).unsqueeze(-1)).squeeze(-1)
    h_first = (v_lo[:, 0] > v_hi[:, 0]).unsqueeze(-1)  # hematoxylin absorbs more red light
    h = torch.where(h_first, v_lo, v_hi)
    e = torch.where(h_first, v_hi, v_lo)
    he = torch.stack([h, e], -1)
    he = he / he.norm(dim=1, keepdim=True).clamp_min(1e-8)
    valid = mask.float().mean(-1) >= MIN_TISSUE_SHARE
    fallback = torch.tensor(RUIFROK_HE, dtype=od.dtype, device=od.device).T
    fallback = fallback / fallback.norm(dim=0, keepdim=True)
    return torch.where(valid.view(-1, 1, 1), he, fallback), valid


def concentrations(od, he):
    """Stain concentrations (B, 2, N) of OD (B, N, 3) under stain matrices he (B, 3, 2), least squares."""
    import torch

    return torch.linalg.pinv(he) @ od.transpose(1, 2)


def _tissue(od):
    return (od > BETA).all(-1)


# ----------------------------------------------------------------------------------------------
# Normalisers
# ----------------------------------------------------------------------------------------------
class MacenkoNormalizer:
    """Macenko (2009) per tile towards a fitted reference; float NCHW 0..255 in and out."""

    def __init__(self, ref: StainReference):
        import torch

        self.ref = ref
        self.he = torch.tensor(ref.values["stain_matrix"], dtype=torch.float32).T  # (3, 2)
        self.max_c = torch.tensor(ref.values["max_conc"], dtype=torch.float32)  # (2,)

    def to(self, device) -> MacenkoNormalizer:
        """Move the reference to `device`; returns self."""
        self.he, self.max_c = self.he.to(device), self.max_c.to(device)
        return self

    def __call__(self, x):
        import torch

        b, _, h, w = x.shape
        od = optical_density(_flat(x.float()))
        sub = od.view(b, h, w, 3)[:, ::2, ::2].reshape(b, -1, 3)  # estimate on every 4th pixel
        mask = _tissue(sub)
        he, valid = estimate_stains(sub, mask)
        c_sub = concentrations(sub, he)
        max_c = torch.stack([masked_quantile(c_sub[:, i], mask, 0.99) for i in range(2)], -1).clamp_min(1e-6)
        c = concentrations(od, he) * (self.max_c / max_c).unsqueeze(-1)
        out = (IO * torch.exp(-(self.he @ c))).clamp(0, 255)  # (B, 3, N)
        out = out.view(b, 3, h, w)
        return torch.where(valid.view(-1, 1, 1, 1), out, x.float())


def rgb_to_lab(x):
    """Reinhard's l-alpha-beta of float RGB 0..255 (B, N, 3)."""
    import torch

    m1 = torch.tensor(_RGB2LMS, dtype=x.dtype, device=x.device)
    m2 = torch.tensor(_LMS2LAB, dtype=x.dtype, device=x.device)
    lms = (x.clamp_min(1.0) / 255.0) @ m1.T
    return torch.log10(lms.clamp_min(1e-6)) @ m2.T


def lab_to_rgb(lab):
    """Inverse of `rgb_to_lab` (exact matrix inverses), float RGB 0..255."""
    import torch

    m1 = torch.tensor(_RGB2LMS, dtype=lab.dtype, device=lab.device)
    m2 = torch.tensor(_LMS2LAB, dtype=lab.dtype, device=lab.device)
    lms = torch.pow(10.0, lab @ torch.linalg.inv(m2).T)
    return (lms @ torch.linalg.inv(m1).T * 255.0).clamp(0, 255)


def _masked_stats(lab, mask):
    m = mask.to(lab.dtype).unsqueeze(-1)
    n = m.sum(1).clamp_min(1.0)
    mean = (lab * m).sum(1) / n
    std = (((lab - mean.unsqueeze(1)) ** 2 * m).sum(1) / n).sqrt()
    return mean, std


class ReinhardNormalizer:
    """Reinhard (2001) per tile: l-alpha-beta mean/std over the tile (as in the paper) matched to the reference."""

    def __init__(self, ref: StainReference):
        import torch

        self.ref = ref
        self.mean = torch.tensor(ref.values["mean"], dtype=torch.float32)
        self.std = torch.tensor(ref.values["std"], dtype=torch.float32)

    def to(self, device) -> ReinhardNormalizer:
        """Move the reference to `device`; returns self."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, x):
        import torch

        b, _, h, w = x.shape
        rgb = _flat(x.float())
        lab = rgb_to_lab(rgb)
        valid = _tissue(optical_density(rgb)).float().mean(-1) >= MIN_TISSUE_SHARE
        mean, std = _masked_stats(lab, torch.ones(lab.shape[:2], dtype=torch.bool, device=lab.device))
        out = (lab - mean.unsqueeze(1)) / std.clamp_min(1e-6).unsqueeze(1) * self.std + self.mean
        out = lab_to_rgb(out).transpose(1, 2).reshape(b, 3, h, w)
        return torch.where(valid.view(-1, 1, 1, 1), out, x.float())


# ----------------------------------------------------------------------------------------------
# Fitting a reference
# ----------------------------------------------------------------------------------------------
def _pixels(img: np.ndarray):
    """(1, H*W, 3) float tensor of an RGB(A) uint8 image; a copy, so read-only arrays (PIL's) are fine for torch."""
    import torch

    return torch.tensor(np.asarray(img)[..., :3]).reshape(1, -1, 3).float()


def fit_reference(method: str, images: list[np.ndarray], *, source: str) -> StainReference:
    """Fit `method` to RGB uint8 images (h, w, 3): one reference image, or a sample of cohort tiles.

    All images' tissue pixels are pooled, so a cohort sample gives one cohort-wide target.
    """
    import torch

    if method not in METHODS:
        raise HefeatError(f"--stain-norm must be one of {', '.join(METHODS)}, got {method!r}")
    if not images:
        raise HefeatError("no image to fit the stain reference to")
    rgb = torch.cat([_pixels(im) for im in images], 1)
    od = optical_density(rgb)
    mask = _tissue(od)
    if float(mask.float().mean()) < MIN_TISSUE_SHARE:
        raise HefeatError(f"the stain reference ({source}) has almost no stained pixels: pick an image with tissue")
    if method == "macenko":
        he, _ = estimate_stains(od, mask)
        c = concentrations(od, he)
        max_c = [float(masked_quantile(c[:, i], mask, 0.99)[0]) for i in range(2)]
        vals = {"stain_matrix": [[round(float(v), 6) for v in he[0, :, j]] for j in range(2)],
                "max_conc": [round(v, 6) for v in max_c]}
    else:
        mean, std = _masked_stats(rgb_to_lab(rgb), torch.ones_like(mask))
        vals = {"mean": [round(float(v), 6) for v in mean[0]], "std": [round(float(v), 6) for v in std[0]]}
    return StainReference(method, vals, source)


def stain_vectors(img: np.ndarray) -> np.ndarray:
    """Macenko H and E unit OD vectors (2, 3) of one RGB uint8 image (for checks and QC)."""

    rgb = _pixels(img)
    od = optical_density(rgb)
    he, valid = estimate_stains(od, _tissue(od))
    if not bool(valid[0]):
        raise HefeatError("image has too few stained pixels to estimate stain vectors")
    return he[0].T.numpy()
