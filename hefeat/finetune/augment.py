"""Training augmentations run on the device, batched, with parameters drawn from counters.

Random 90° rotations and mirrors (the dihedral group, ST-Net/EMO), HED stain jitter (Tellez et al.,
"Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference", IEEE TMI 2018:
scale and shift each haematoxylin/eosin/DAB optical density), and brightness/contrast jitter.
Parameters come from a generator seeded by (seed, epoch, step, micro-batch, rank), so a resumed
job draws exactly the augmentations the uninterrupted one drew, whatever the worker count.
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB optical densities in RGB).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)


def counter_generator(*keys: int):
    """A CPU torch.Generator seeded by a hash of integer keys."""
    import torch

    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def dihedral_apply(x, k):
    """Apply dihedral element k (0..7: k % 4 quarter turns, mirrored first when k >= 4) per sample of NCHW x."""
    import torch

    out = torch.empty_like(x)
    for e in range(8):
        sel = (k == e).nonzero(as_tuple=True)[0]
        if len(sel) == 0:
            continue
        v = x[sel]
        if e >= 4:
            v = torch.flip(v, dims=(3,))
        out[sel] = torch.rot90(v, e % 4, dims=(2, 3))
    return out


def hed_jitter(x_rgb, alpha, beta):
    """Scale (alpha) and shift (beta) the H, E, D optical densities of RGB x in [0, 255]; alpha, beta (B, 3)."""
    import torch

    m = torch.as_tensor(_RGB_FROM_HED, dtype=x_rgb.dtype, device=x_rgb.device)
    od = -torch.log((x_rgb + 1.0) / 256.0)
    hed = torch.einsum("bchw,cd->bdhw", od, torch.linalg.inv(m))
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    od2 = torch.einsum("bdhw,dc->bchw", hed, m)
    return (256.0 * torch.exp(-od2) - 1.0).clamp_(0.0, 255.0)


def brightness_contrast(x_rgb, bright, contrast):
    """x * bright, then contrast around each image's mean; bright, contrast (B,)."""
    mean = x_rgb.mean(dim=(1, 2, 3), keepdim=True)
    y = (x_rgb - mean) * contrast[:, None, None, None] + mean * bright[:, None, None, None]
    return y.clamp_(0.0, 255.0)


class Augmenter:
    """Augments a normalised NCHW batch (as the encoder transform made it) in place of the model input."""

    def __init__(self, names: tuple[str, ...], *, mean, std, hed_sigma: float = 0.05, jitter: float = 0.1):
        self.names = tuple(names)
        self.mean, self.std = mean, std  # (1, 3, 1, 1) tensors in 0-255 units (DeviceTransform's)
        self.hed_sigma, self.jitter = hed_sigma, jitter

    def __call__(self, x, gen):
        """x: normalised (B, 3, H, W); gen: a CPU torch.Generator. Returns the augmented batch."""
        import torch

        b = x.shape[0]
        dev = x.device

        def u(lo, hi, *shape):
            return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(dev)

        if "hed" in self.names or "brightness_contrast" in self.names:
            raw = x.float() * self.std + self.mean
            if "hed" in self.names:
                s = self.hed_sigma
                raw = hed_jitter(raw, u(1 - s, 1 + s, b, 3), u(-s, s, b, 3))
            if "brightness_contrast" in self.names:
                j = self.jitter
                raw = brightness_contrast(raw, u(1 - j, 1 + j, b), u(1 - j, 1 + j, b))
            x = ((raw - self.mean) / self.std).to(x.dtype)
        if "dihedral" in self.names:
            x = dihedral_apply(x, torch.randint(0, 8, (b,), generator=gen).to(dev))
        return x.contiguous(memory_format=torch.channels_last)
