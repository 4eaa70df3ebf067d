"""Stain normalisation: Macenko maps stain vectors to the target's, Reinhard matches l-alpha-beta statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hefeat.errors import HefeatError
from hefeat.slides.stain import (
    IO,
    RUIFROK_HE,
    StainReference,
    fit_reference,
    rgb_to_lab,
    stain_vectors,
)

TARGET_HE = np.array(RUIFROK_HE)  # Ruifrok & Johnston's H and E
SOURCE_HE = np.array([[0.45, 0.80, 0.40], [0.20, 0.90, 0.38]])  # a bluer hematoxylin, a duller eosin


def _unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def beer_lambert(he: np.ndarray, seed: int, size: int = 128, scale=(1.0, 1.0)) -> np.ndarray:
    """An H&E-like image: Io * exp(-(H c_h + E c_e)) with nuclei blobs, stroma and 25 % glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    c_e = rng.gamma(4.0, 0.12, (size, size)) * scale[1]
    c_h = rng.gamma(1.5, 0.05, (size, size))
    for _ in range(25):  # nuclei
        cy, cx, r = rng.integers(0, size, 2).tolist() + [rng.integers(3, 7)]
        c_h += np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, rng.uniform(0.8, 1.4), 0.0)
    c_h *= scale[0]
    glass = xx < size // 4
    c_h[glass], c_e[glass] = 0.0, 0.0
    od = c_h[..., None] * _unit(he)[0] + c_e[..., None] * _unit(he)[1]
    return np.clip(IO * np.exp(-od) + rng.normal(0, 0.5, od.shape), 0, 255).astype(np.uint8)


def _cos(a, b):
    return float((_unit(a) * _unit(b)).sum(1).min())


def _apply(ref: StainReference, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return ref.normalizer()(x)[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def test_macenko_estimates_known_stain_vectors():
    """On a Beer-Lambert image made from known vectors, the estimate recovers them (cosine > 0.99)."""
    assert _cos(stain_vectors(beer_lambert(TARGET_HE, 0)), TARGET_HE) > 0.99
    assert _cos(stain_vectors(beer_lambert(SOURCE_HE, 1)), SOURCE_HE) > 0.99


def test_macenko_maps_source_stain_vectors_to_the_targets():
    """Normalising a source image moves its stain vectors from the source's to the target's."""
    ref = fit_reference("macenko", [beer_lambert(TARGET_HE, 2)], source="image:target")
    src = beer_lambert(SOURCE_HE, 3, scale=(1.6, 0.6))
    assert _cos(stain_vectors(src), TARGET_HE) < 0.98
    out = _apply(ref, src)
    assert _cos(stain_vectors(out), TARGET_HE) > 0.99
    # Concentration scaling: the normalised image's 99th-percentile H/E match the target's (within 20 %,
    # re-estimated from the rounded 8-bit output under its own, slightly different, stain matrix).
    again = fit_reference("macenko", [out], source="check")
    np.testing.assert_allclose(again.values["max_conc"], ref.values["max_conc"], rtol=0.2)
    assert (out[:, :20] >= 230).all()  # glass stays glass


def test_macenko_leaves_a_tile_without_tissue_unchanged():
    ref = fit_reference("macenko", [beer_lambert(TARGET_HE, 4)], source="t")
    blank = np.full((64, 64, 3), 245, np.uint8)
    np.testing.assert_array_equal(_apply(ref, blank), blank)


def test_reinhard_matches_lab_statistics_and_real_tiles(cmu_svs):
    """Reinhard: the normalised tile's l-alpha-beta mean/std equal the reference's; real CMU tiles."""
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as s:
        tgt = np.asarray(s.read_region((880, 2250), 0, (256, 256)).convert("RGB"))
        src = np.asarray(s.read_region((1000, 1500), 0, (256, 256)).convert("RGB"))
    src = np.clip(src.astype(float) * [0.8, 0.95, 1.1], 0, 255).astype(np.uint8)  # a colour-shifted scan
    ref = fit_reference("reinhard", [tgt], source="image:cmu")
    out = fit_reference("reinhard", [_apply(ref, src)], source="check")
    np.testing.assert_allclose(out.values["mean"], ref.values["mean"], atol=0.02)
    np.testing.assert_allclose(out.values["std"], ref.values["std"], rtol=0.1)
    before = fit_reference("reinhard", [src], source="check")
    assert np.abs(np.subtract(before.values["mean"], ref.values["mean"])).max() > 0.05
    lab = rgb_to_lab(torch.tensor([[[255.0, 255.0, 255.0]]]))
    assert abs(float(lab[0, 0, 1])) < 1e-3 and abs(float(lab[0, 0, 2])) < 1e-3  # white has no colour


def test_reference_round_trip_and_bad_input():
    ref = fit_reference("macenko", [beer_lambert(TARGET_HE, 5)], source="image:t")
    back = StainReference.from_dict(ref.to_dict())
    assert back == ref and len(ref.digest) == 12
    assert fit_reference("reinhard", [beer_lambert(TARGET_HE, 5)], source="x").digest != ref.digest
    with pytest.raises(HefeatError, match="stain-norm"):
        fit_reference("vahadane", [beer_lambert(TARGET_HE, 5)], source="x")
    with pytest.raises(HefeatError, match="stained pixels"):
        fit_reference("macenko", [np.full((32, 32, 3), 250, np.uint8)], source="blank")
