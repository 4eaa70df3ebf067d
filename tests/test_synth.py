"""The synthetic cohort: files OpenSlide reads as intended, expression that follows the truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from hefeat.slides.reader import Slide


def test_files_reopen_with_intended_mpp_and_levels(cohort):
    truth = json.loads((cohort / "truth.json").read_text())
    mpps = set()
    for sid, info in truth["slides"].items():
        with Slide(cohort / "slides" / f"{sid}.tiff") as s:
            assert s.mpp.x == info["mpp"] and s.level_count == info["levels"] >= 2
            assert abs(s.dimensions[0] * s.mpp.x - 1200) < 2
            mpps.add(s.mpp.x)
    assert mpps == {0.25, 0.5}


def test_expression_follows_the_truth_function(cohort):
    truth = json.loads((cohort / "truth.json").read_text())
    expr = pd.read_parquet(cohort / "expression.parquet").set_index("sample_id")
    comp = np.array([truth["slides"][s]["composition"] for s in expr.index])
    morph = np.array([[truth["slides"][s]["morphology"][k] for k in truth["morphology"]] for s in expr.index])
    W, M, mu = np.array(truth["weights"]), np.array(truth["morph_weights"]), np.array(truth["mu"])
    expected = mu + comp @ W.T + morph @ M.T
    observed = np.log2(expr[truth["genes"]].to_numpy() + 1)
    sig = [truth["genes"].index(g) for g in truth["signal_genes"]]
    nul = [truth["genes"].index(g) for g in truth["null_genes"]]
    resid = observed - expected
    assert np.abs(resid.mean(0)).max() < 0.6  # noise around the truth, no bias
    r_sig = [np.corrcoef(expected[:, g], observed[:, g])[0, 1] for g in sig if expected[:, g].std() > 0.2]
    assert np.median(r_sig) > 0.7
    # Null genes carry no composition signal: R² of a regression on composition stays small.
    X = np.c_[np.ones(len(comp)), comp[:, :3]]
    r2 = []
    for g in nul:
        beta, *_ = np.linalg.lstsq(X, observed[:, g], rcond=None)
        r2.append(1 - ((observed[:, g] - X @ beta) ** 2).sum() / ((observed[:, g] - observed[:, g].mean()) ** 2).sum())
    assert np.median(r2) < 0.5


def test_spots_and_clinical(cohort):
    sp = pd.read_parquet(cohort / "spots.parquet")
    truth = json.loads((cohort / "truth.json").read_text())
    with_spots = {s for s, i in truth["slides"].items() if i["has_spots"]}
    assert set(sp["slide_id"]) == with_spots and len(sp) > 50
    counts = sp[truth["genes"]].to_numpy()
    assert (counts >= 0).all() and counts.sum(1).min() > 1000
    clin = pd.read_csv(cohort / "clinical.csv")
    assert {"patient_id", "site", "survival_months", "event", "msi_status", "er_status"} <= set(clin.columns)
    lymph = np.array([truth["slides"][s]["composition"][2] for s in clin["slide_id"]])
    if clin["msi_status"].nunique() == 2:
        assert lymph[clin["msi_status"] == 1].mean() > lymph[clin["msi_status"] == 0].mean()


def test_cohort_is_deterministic(tmp_path):
    from hefeat.slides.synth import make_cohort

    for k in ("a", "b"):
        make_cohort(tmp_path / k, n_slides=2, n_genes=20, seed=5, width_um=400, height_um=300, workers=1)
    assert (tmp_path / "a" / "truth.json").read_text() == (tmp_path / "b" / "truth.json").read_text()
    assert (tmp_path / "a/slides/S01.tiff").read_bytes() == (tmp_path / "b/slides/S01.tiff").read_bytes()



def test_class_map_and_pyramid_levels_equal_their_plain_numpy_definitions():
    """render_slide's class map (fields resized one at a time, no stacked argmax) is argmax over the resized fields,
    ties to the first class; a pyramid level is the floored 2x2 mean of the level above (odd edges dropped)."""
    from hefeat.slides.synth import _classes_from_fields, _classes_resized, _half, _resize_f

    rng = np.random.default_rng(0)
    fields = rng.normal(size=(5, 30, 40)).astype(np.float32)
    fields[2] = fields[1]  # an exact tie everywhere: argmax keeps the first of the two
    fields[3, :10] = fields[0, :10]
    want = _classes_from_fields(np.stack([_resize_f(f, 240, 320) for f in fields]))
    np.testing.assert_array_equal(_classes_resized(fields, 240, 320), want)
    assert set(np.unique(want)) == {0, 1, 3, 255}
    for h, w in ((64, 80), (63, 81)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[:4, :4] = 255  # the largest sum (1020) and exact halves
        h2, w2 = h // 2 * 2, w // 2 * 2
        want = rgb[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2, 3).mean((1, 3)).astype(np.uint8)
        np.testing.assert_array_equal(_half(rgb), want)
