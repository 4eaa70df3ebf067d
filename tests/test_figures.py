"""Figures tell the truth at a glance: honest scales, shared ranges, reference statistics, valid PNGs."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hefeat.figures.base import is_categorical, nice_length, robust_scale
from hefeat.figures.metrics import (
    comparison,
    learning_curves,
    predicted_vs_measured,
    r_distribution,
    roc_curves,
    transfer_comparison,
)
from hefeat.figures.spatial import SlideImage, spot_map, tile_overlay, trait_maps
from hefeat.figures.survival import kaplan_meier
from hefeat.figures.umap import umap_scatter


def _png(buf: io.BytesIO) -> Image.Image:
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    assert img.format == "PNG" and min(img.size) > 200
    return img


def _img() -> SlideImage:
    rgb = np.full((100, 160, 3), 240, np.uint8)
    rgb[20:80, 30:130] = (180, 90, 170)  # "tissue"
    return SlideImage(rgb, scale=0.1, mpp0=0.5, slide_id="S")


def test_robust_scale_ignores_the_skewed_tail():
    """A 2nd–98th percentile range (numpy's percentiles), shared by all arrays, with the clipped share stated."""
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 1.5, 5000), rng.normal(5, 1, 100)
    s = robust_scale(a, b)
    both = np.concatenate([a, b])
    assert s.vmin == pytest.approx(np.percentile(both, 2)) and s.vmax == pytest.approx(np.percentile(both, 98))
    assert s.clipped_high == pytest.approx(0.02, abs=0.002) and s.extend == "both" and "beyond" in s.note
    assert robust_scale(np.ones(10)).vmax > robust_scale(np.ones(10)).vmin  # constant data still has a range
    assert nice_length(730) == 500 and nice_length(0.3) == pytest.approx(0.2)
    assert is_categorical(["a", "b"]) and is_categorical([0, 1, 1]) and not is_categorical(np.linspace(0, 1, 50))


def test_tile_overlay_places_values_and_counts_missing():
    img = _img()
    tiles = pd.DataFrame({"x": [300, 500, 700], "y": [200, 200, 400], "size0": [200.0] * 3})
    buf = io.BytesIO()
    r = tile_overlay(img, tiles, [1.5, np.nan, 3.25], label="v (units)", title="t", out=buf)
    _png(buf)
    ov = r["overlay"]
    assert r["kind"] == "continuous" and r["missing"] == 1
    assert ov[20:40, 30:50].mean() == 1.5 and np.isnan(ov[20:40, 50:70]).all() and ov[40:60, 70:90].mean() == 3.25
    cat = tile_overlay(img, tiles, ["a", None, "b"], label="label", title="t", out=io.BytesIO())
    assert cat["kind"] == "categorical" and cat["categories"] == ["a", "b"] and cat["missing"] == 1  # no "nan" class
    many = tile_overlay(img, pd.concat([tiles] * 10, ignore_index=True), [f"c{i}" for i in range(30)], label="l",
                        title="t", out=io.BytesIO())
    assert len(many["categories"]) == 12 and many["categories"][-1] == "other"


def test_spatial_maps_share_one_scale():
    img = _img()
    c = np.array([[400, 300], [600, 300], [800, 500]], float)
    buf = io.BytesIO()
    r = spot_map(img, c, 150, {"measured": np.array([0.0, 1, 2]), "predicted": np.array([10.0, 11, 12])},
                 label="log count", title="g", out=buf)
    _png(buf)
    assert r["vmin"] < 0.2 and r["vmax"] > 11.8  # one range spans both panels
    tiles = pd.DataFrame({"x": [300, 500, 700], "y": [200, 200, 400], "size0": [200.0] * 3})
    t = trait_maps(img, tiles, {"A": np.array([1, 0, 1], bool), "B": np.array([1, 1, 0], bool)}, title="t",
                   note="HTI ...", out=io.BytesIO())
    assert t["combinations"] == {"none high": 0, "A high": 1, "B high": 1, "A+B high": 1}
    assert t["legend"] == ["none high", "A high", "B high", "A+B high"]
    t = trait_maps(img, tiles, {"A": np.array([1, 0, 1], bool), "B": np.array([0, 0, 0], bool)}, title="t",
                   out=io.BytesIO())  # legend and colours for the combinations present only
    assert t["combinations"] == {"none high": 1, "A high": 2, "B high": 0, "A+B high": 0}
    assert t["legend"] == ["none high", "A high"]


def test_kaplan_meier_matches_hand_computation():
    """Five deaths at t = 1..5: S(t) = 0.8, 0.6, 0.4, ... so the median survival is 3; y axis starts at 0."""
    buf = io.BytesIO()
    r = kaplan_meier({"a": (np.arange(1, 6), np.ones(5)), "b": (np.array([2, 4, 6, 8]), np.array([1, 0, 0, 1]))},
                     title="t", time_label="months", p_value=0.04, out=buf)
    _png(buf)
    assert r["median_survival"]["a"] == 3 and r["ylim"][0] == 0
    assert r["groups"]["b"] == {"n": 4, "events": 2}


def test_metric_figures_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1, 200)
    buf = io.BytesIO()
    res = roc_curves([{"label": "model", "y_true": y, "score": s},
                      {"label": "given", "fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1], "auc": 0.65, "ci_low": 0.6, "ci_high": 0.7,
                       "n_pos": 10, "n_neg": 12}], title="t", n_boot=200, out=buf)
    _png(buf)
    auc, lo, hi = res["model"]
    assert auc == pytest.approx(roc_auc_score(y, s)) and lo < auc < hi
    r = r_distribution(np.r_[rng.normal(-0.2, 0.1, 80), rng.normal(0.7, 0.1, 20)], metric="spearman r", title="t",
                       threshold=0.5, r_null=rng.normal(-0.1, 0.1, 500), out=io.BytesIO())
    assert r["n"] == 100 and 15 <= r["n_significant"] <= 25
    predicted_vs_measured([{"name": "g", "measured": y, "predicted": s, "stat": "r = 0.5"}], units="log1p",
                          title="t", out=io.BytesIO())
    comparison(pd.DataFrame({"name": ["a", "b"], "auc": [0.6, 0.8], "lo": [0.5, 0.7], "hi": [0.7, 0.9]}), value="auc",
               lo="lo", hi="hi", reference=0.5, reference_label="chance", title="t", out=io.BytesIO())
    h = pd.DataFrame({"fold": [0, 0, 0, 1, 1, 1], "epoch": [1, 2, 3] * 2, "train_loss": [1.0, 0.6, 0.4, 1.1, 0.7, 0.5],
                      "val_loss": [1.0, 0.5, 0.6, 1.2, 0.6, 0.7]})
    assert learning_curves(h, title="t", out=io.BytesIO())["best"] == 2
    rows = pd.DataFrame({"b_share": [0.1, 0.1, 0.5, 0.5] * 2, "split": [0, 1] * 4, "arm": ["a"] * 4 + ["b"] * 4,
                         "auc": [0.6, 0.62, 0.7, 0.72, 0.55, 0.5, 0.6, 0.65]})
    tests = pd.DataFrame({"b_share": [0.1], "comparison": ["a vs b"], "wilcoxon_p": [0.04], "median_diff": [0.08]})
    assert transfer_comparison(rows, tests=tests, title="t", out=io.BytesIO())["arms"] == ["a", "b"]


def test_bootstrap_roc_equals_sklearns_roc_curve_and_auc_to_the_bit():
    """The report's bootstrap band and AUC CI (figures.metrics._bootstrap_roc, sklearn's validation skipped) equal
    the loop over roc_curve / roc_auc_score: tied scores, tiny samples, constant scores, perfect separation."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from hefeat.figures.metrics import _bootstrap_roc

    def reference(y, s, grid, n_boot, seed):
        rng = np.random.default_rng(seed)
        aucs, tprs = [], []
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            if len(np.unique(y[i])) < 2:
                continue
            f, t, _ = roc_curve(y[i], s[i])
            aucs.append(roc_auc_score(y[i], s[i]))
            tprs.append(np.interp(grid, f, t))
        return np.array(aucs), np.array(tprs)

    rng = np.random.default_rng(3)
    grid = np.linspace(0, 1, 101)
    cases = []
    for n in (3, 5, 12, 60, 300):
        y = rng.integers(0, 2, n)
        cases += [(y, y + rng.normal(0, 1, n)), (y, np.round(y + rng.normal(0, 1, n))), (y, np.zeros(n)),
                  (y, y.astype(float)), (y, -rng.integers(0, 3, n).astype(float))]
    for k, (y, s) in enumerate(cases):
        got, want = _bootstrap_roc(y, s, grid, 20, k), reference(y, s, grid, 20, k)
        assert len(got[0]) == len(want[0]) > 0, k
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes(), k


def test_umap_scatter_links_thumbnails():
    rng = np.random.default_rng(2)
    xy = rng.normal(size=(500, 2))
    buf = io.BytesIO()
    thumbs = [(i, np.full((32, 32, 3), 200, np.uint8)) for i in (0, 10, 20, 30)]
    r = umap_scatter(xy, rng.lognormal(0, 2, 500), title="t", color_label="x (u)", thumbnails=thumbs, out=buf)
    _png(buf)
    assert r["color"] == "continuous" and r["vmax"] < 100  # robust range, not the lognormal's max
    c = umap_scatter(xy, pd.Series(["a", "b", None, "c", "d"] * 100), title="t", color_label="site", out=io.BytesIO())
    assert c["categories"] == ["a", "b", "c", "d"]
