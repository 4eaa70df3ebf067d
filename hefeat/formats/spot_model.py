"""The synthetic cohort's spot-count model, in one place.

`make_cohort` (hefeat.slides.synth) draws its own square-grid spots from it and the Visium / HEST / ST
layouts (synth_layouts.py) draw their hexagonal or coarse grids from it, from the class and gland maps
that make_cohort writes to truth/<slide>.classes.npz. It sits in the lowest layer so both can import it.
"""

from __future__ import annotations

import numpy as np

SPOT_AMPLITUDE = 0.9  # of the morphology genes' spot shares (morphology_shares)
MORPHOLOGY = ("gland_index",)


def morphology_of(cls: np.ndarray, gland: np.ndarray) -> dict[str, float]:
    """gland_index (glandular minus solid tumour share of the tissue) and the glandular share of tumour."""
    tissue = cls != 255
    n = max(int(tissue.sum()), 1)
    tum = cls == 0
    g = (tum & gland).sum() / n
    s = (tum & ~gland).sum() / n
    return {"gland_index": float(g - s), "gland_share": float((tum & gland).sum() / max(int(tum.sum()), 1))}


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


def spot_shares(mu: np.ndarray, W: np.ndarray, M: np.ndarray, comp: np.ndarray, morph: np.ndarray) -> np.ndarray:
    """Expected share of each gene in a spot's counts.

    Null genes keep a fixed share 2**mu / sum(2**mu) (so normalising by the spot total gives them no
    signal); composition genes (a non-zero row of W) split their fixed pool by 2 ** (mu + W . composition);
    the morphology genes (a non-zero row of M) share a pool of fixed mass by their morphology
    (morphology_shares). Every pool's mass is constant, so no gene carries another pool's signal through
    the spot total.
    """
    morph_sig = (M != 0).any(1)
    sig = (W != 0).any(1) & ~morph_sig
    share = 2.0**mu / (2.0**mu).sum()
    r = 2.0 ** (mu[sig] + W[sig] @ comp)
    out = share.copy()
    out[sig] = share[sig].sum() * r / r.sum()
    out[morph_sig] = morphology_shares(share[morph_sig], M[morph_sig], morph)
    return out


def draw_spots(cls: np.ndarray, gland: np.ndarray, class_mpp: float, truth: dict, rng: np.random.Generator,
               xy_um: np.ndarray, diameter_um: float) -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray]:
    """Counts of spots centred at xy_um (shape (n, 2), µm, drawn in that order) on a slide's class/gland maps.

    A spot counts when its whole disk lies on the class map and at least half of it is tissue; its class
    fractions and morphology give each gene's expected share (spot_shares) of a Poisson draw of
    20,000-40,000 UMIs (Visium-like depth). Returns (kept indices into xy_um, class fractions (n_kept,
    n_classes), morphology per kept spot, counts (n_kept, n_genes)).
    """
    W, mu = np.asarray(truth["weights"]), np.asarray(truth["mu"])
    M = np.asarray(truth.get("morph_weights", np.zeros((len(mu), len(MORPHOLOGY)))))
    n_classes = W.shape[1]
    r = diameter_um / 2 / class_mpp
    yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
    disk = (yy**2 + xx**2) <= r * r
    kept, fracs, morphs, counts = [], [], [], []
    for k, (x, y) in enumerate(np.asarray(xy_um, float)):
        cy, cx = int(y / class_mpp), int(x / class_mpp)
        if cy - int(r) < 0 or cx - int(r) < 0:
            continue
        win = (slice(cy - int(r), cy + int(r) + 1), slice(cx - int(r), cx + int(r) + 1))
        if cls[win].shape != disk.shape:
            continue
        vals, gvals = cls[win][disk], gland[win][disk]
        tissue = vals != 255
        if tissue.mean() < 0.5:
            continue
        comp = np.array([(vals[tissue] == c).mean() for c in range(n_classes)])
        morph = morphology_of(vals, gvals)
        morph["frac_glandular"] = float(((vals == 0) & gvals).sum() / max(int(tissue.sum()), 1))
        depth = rng.uniform(20_000, 40_000)
        kept.append(k)
        fracs.append(comp)
        morphs.append(morph)
        counts.append(rng.poisson(depth * spot_shares(mu, W, M, comp, np.array([morph[m] for m in MORPHOLOGY]))))
    return (np.asarray(kept, int), np.asarray(fracs, float).reshape(-1, n_classes), morphs,
            np.asarray(counts, np.int64).reshape(-1, len(mu)))
