"""The morphology programme of the synthetic cohort: glandular vs solid tumour at matched colour and texture."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hefeat.formats.spot_model import spot_shares as _spot_shares
from hefeat.slides.qc import tile_qc
from hefeat.slides.synth import CLASS_MPP, SlideSpec, render_slide, slide_layout
from hefeat.slides.synth_morphology import (
    GLAND_SPACING_UM,
    MORPHOLOGY_GENES,
    glandular_fraction,
    morphology_of,
)

MPP, TILE = 1.0, 112  # the demo's tiles


@pytest.fixture(scope="module")
def pure_tiles():
    """Tiles that are all glandular or all solid tumour, from a few slides: (rgb, is_glandular, slide)."""
    tiles, label, slide = [], [], []
    for seed in range(1000, 1040):
        spec = SlideSpec("S", "P", "s", seed, MPP, 1600.0, 1200.0, False)
        cls, fields, info = slide_layout(spec)
        if not (cls == 0).any():
            continue
        rgb = render_slide(spec, fields, info["gland_field"])
        ys, xs = np.mgrid[0:rgb.shape[0] - TILE:TILE // 2, 0:rgb.shape[1] - TILE:TILE // 2]
        x, y = xs.ravel(), ys.ravel()
        gi = glandular_fraction(cls, info["gland"], CLASS_MPP, x, y, TILE, MPP)
        k, cx, cy = int(TILE * MPP / CLASS_MPP), (x * MPP / CLASS_MPP).astype(int), (y * MPP / CLASS_MPP).astype(int)
        tumour = np.array([(cls[b:b + k, a:a + k] == 0).mean() for a, b in zip(cx, cy, strict=True)])
        for i in np.flatnonzero((np.abs(gi) >= 0.95) & (tumour >= 0.95)):
            tiles.append(rgb[y[i]:y[i] + TILE, x[i]:x[i] + TILE])
            label.append(gi[i] > 0)
            slide.append(seed)
        if len(set(slide)) >= 8 and min(sum(label), len(label) - sum(label)) >= 60:
            break
    return np.stack(tiles), np.array(label), np.array(slide)


def test_glandular_and_solid_tumour_share_colour_and_texture_statistics(pure_tiles):
    """Same nuclei, other arrangement: every QC measure (the colour/texture baseline's inputs) agrees.

    Measured (seeds 1000+, 1 µm/px): mean RGB within 0.6 grey levels, sharpness within 3.5 %, density within 0.002.
    """
    rgb, gl, _ = pure_tiles
    q = pd.DataFrame([tile_qc(t) for t in rgb])
    d = q[gl].mean() - q[~gl].mean()
    for c in ("mean_r", "mean_g", "mean_b"):
        assert abs(d[c]) < 1.5, (c, d[c])
    assert abs(d["sharpness"]) / q["sharpness"].mean() < 0.06
    assert abs(d["density"]) < 0.01 and abs(d["background_frac"]) < 0.01
    # ...while the arrangement differs: glands sit on a lattice, so the nuclear (dark) pixels' power spectrum
    # peaks at the gland spacing (GLAND_SPACING_UM), where scattered nuclei have no peak.
    dark = (rgb.mean(-1) < 120).astype(np.float32)
    f = np.abs(np.fft.fft2(dark - dark.mean((1, 2), keepdims=True))) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(TILE), np.fft.fftfreq(TILE))) * TILE * MPP  # cycles per tile
    ring = np.abs(k - TILE * MPP / GLAND_SPACING_UM) < 0.75
    peak = f[:, ring].sum(1) / f[:, (k > 0) & (k < 12)].sum(1)
    assert peak[gl].mean() > 1.2 * peak[~gl].mean()  # measured 1.37×


def test_pretrained_encoder_tells_architecture_that_colour_cannot(pure_tiles):
    """EfficientNet-Lite0 (the demo's ImageNet weights, bundled) separates glandular from solid tumour tiles
    on held-out slides; the six QC measures cannot. Measured: AUC 1.00 vs 0.35."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hefeat.extract.encoders import create_encoder

    rgb, gl, slide = pure_tiles
    # Each slide draws its fibre orientation (horizontal or vertical); with a handful of slides that nuisance
    # can line up with the label. Architecture does not turn with the tile, so every tile enters twice.
    rgb = np.ascontiguousarray(np.concatenate([rgb, np.rot90(rgb, 1, (1, 2))]))
    gl, slide = np.r_[gl, gl], np.r_[slide, slide]
    enc = create_encoder("efficientnet-lite0", weights="bundled")
    cfg = enc.config
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    with torch.no_grad():
        F = enc(x).numpy()
    Q = pd.DataFrame([tile_qc(t) for t in rgb]).to_numpy()
    auc = {}
    for name, X in (("encoder", F), ("qc", Q)):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        p = cross_val_predict(model, X, gl, groups=slide, cv=GroupKFold(3), method="predict_proba")[:, 1]
        auc[name] = roc_auc_score(gl, p)
    assert auc["encoder"] > 0.9 and auc["qc"] < 0.75, auc


def test_spot_pools_keep_morphology_and_composition_apart():
    """A spot's morphology-gene shares depend on its morphology only, every other gene's on composition only.

    Spot targets are normalised by the spot total, so a pool whose mass moved would leak its signal into
    every gene (the first version let the morphology pool move and the composition genes' r fell 0.6 -> 0.2).
    """
    rng = np.random.default_rng(0)
    n = 12
    mu = rng.uniform(3, 8, n)
    mu[4:7] = [6.0, 6.0, 7.0]  # two markers up, one falling with twice the base: a balanced pool
    W = np.zeros((n, 4))
    W[:4] = rng.normal(0, 2, (4, 4))
    M = np.zeros((n, 1))
    M[4:7, 0] = [3.0, 2.0, -3.0]
    comps = [rng.dirichlet(np.ones(4)) for _ in range(5)]
    by_comp = np.stack([_spot_shares(mu, W, M, c, np.array([0.4])) for c in comps])
    by_morph = np.stack([_spot_shares(mu, W, M, comps[0], np.array([g])) for g in (-0.8, 0.0, 0.8)])
    np.testing.assert_allclose(np.r_[by_comp.sum(1), by_morph.sum(1)], 1.0)
    np.testing.assert_allclose(by_comp[:, 4:7], np.broadcast_to(by_comp[0, 4:7], (5, 3)), rtol=1e-12)
    rest = np.r_[0:4, 7:n]
    np.testing.assert_allclose(by_morph[:, rest], np.broadcast_to(by_morph[0, rest], (3, len(rest))), rtol=1e-12)
    assert by_comp[:, :4].std(0).min() > 0  # composition genes do move with composition
    assert by_morph[2, 4] / by_morph[0, 4] == pytest.approx((1 + 0.9 * 0.8) / (1 - 0.9 * 0.8))
    assert by_morph[2, 6] < by_morph[1, 6] < by_morph[0, 6]  # the falling gene falls
    M[6, 0] = 0.0
    M[8, 0], mu[8] = -1.0, 3.0  # a falling gene whose base is too small to balance the markers
    with pytest.raises(ValueError, match="balance"):
        _spot_shares(mu, W, M, comps[0], np.array([0.5]))


def test_gland_index_truth_and_independence_from_composition(cohort):
    """Per-spot and per-tile truth from the class and gland maps; gland_index is uncorrelated with tumour share."""
    cls = np.array([[0, 0, 1, 255], [0, 0, 1, 255]], np.uint8)
    gland = np.array([[1, 0, 1, 1], [1, 0, 0, 0]], bool)
    assert morphology_of(cls, gland) == {"gland_index": pytest.approx(0.0), "gland_share": pytest.approx(0.5)}
    gi = glandular_fraction(cls, gland, 4.0, np.array([0.0, 4.0]), np.array([0.0, 0.0]), 4.0, 1.0)
    np.testing.assert_allclose(gi, [1.0, -1.0])  # first column glandular tumour, second solid tumour

    truth = json.loads((cohort / "truth.json").read_text())
    assert truth["morphology_genes"] == list(MORPHOLOGY_GENES)
    assert set(MORPHOLOGY_GENES) <= set(truth["signal_genes"])
    W = pd.DataFrame(truth["weights"], index=truth["genes"])
    assert (W.loc[list(MORPHOLOGY_GENES)] == 0).all().all()  # morphology only
    sp = pd.read_parquet(cohort / "truth" / "spots.parquet")
    assert sp["gland_index"].std() > 0.2
    assert abs(np.corrcoef(sp["gland_index"], sp["frac_tumour"])[0, 1]) < 0.25


def test_demo_reports_the_gain_per_gene_group(tmp_path):
    from hefeat.demo_stages import morphology_gain

    truth = {"genes": ["A", "CDX2", "N"], "weights": [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
             "morphology_genes": ["CDX2"]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    m = pd.DataFrame({"gene": ["A", "CDX2", "N"], "mean_r_model": [0.8, 0.7, 0.0], "mean_r_qc_baseline": [0.75, 0.1, 0.0]})
    g = morphology_gain(m, tmp_path / "truth.json")
    assert g["morphology"]["genes"] == ["CDX2"] and g["morphology"]["gain"] == pytest.approx(0.6)
    assert g["colour"]["genes"] == ["A"] and g["colour"]["gain"] == pytest.approx(0.05)
    assert "+0.60" in g["text"] and "+0.05" in g["text"]
    assert morphology_gain(m[m["gene"] != "CDX2"], tmp_path / "truth.json") is None
