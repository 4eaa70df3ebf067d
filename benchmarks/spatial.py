"""Spot heads at ST-Net scale and HTI/cartographies for a large cohort, on synthetic arrays.

- Spot heads: 30,000 spots x 250 genes x 1,024-d, leave-one-patient-out over 23 patients, ridge with
  per-gene penalty (15 candidates) per fold: total fit time.
- HTI + cartography grids for 1,000 slides x 2,000 tiles x 2 traits; PNG rendering timed on 20 slides.
- One spot fold against scikit-learn's RidgeCV(alpha_per_target=True) (time ratio, penalties, predictions).
Run: python benchmarks/spatial.py            (SPOT_FOLDS=2 SPOT_ONLY=1 for the ridge part with 2 folds only)
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    from hefeat.learn.hti import combination_codes, hti
    from hefeat.learn.ridge import fit_ridge_heads

    rng = np.random.default_rng(0)
    n, g, d, P = 30_000, 250, 1024, 23
    latent = rng.normal(size=(n, 12))
    X = (latent @ rng.normal(size=(12, d)) + rng.normal(size=(n, d))).astype(np.float32)
    Y = (latent @ rng.normal(size=(12, g)) * (rng.random(g) < 0.4) + rng.normal(size=(n, g))).astype(np.float32)
    patient = rng.integers(0, P, n)
    folds = int(os.environ.get("SPOT_FOLDS", P))  # fewer folds for a quick ratio on a busy machine
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"),
           "load_before": [round(v, 2) for v in os.getloadavg()]}
    # one fold against scikit-learn's RidgeCV(alpha_per_target=True) on the same arrays (same estimator, float64)
    from sklearn.linear_model import RidgeCV

    tr = patient != 0
    alphas = np.logspace(-2, 5, 15)
    t = time.perf_counter()
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X[tr].astype(np.float64), Y[tr].astype(np.float64))
    t_sk = time.perf_counter() - t
    t = time.perf_counter()
    ours = fit_ridge_heads(X[tr], Y[tr], alphas=alphas, dtype=np.float32)
    t_ours = time.perf_counter() - t
    pr, po = ref.predict(X[~tr].astype(np.float64)), ours.predict(X[~tr])
    res["spot_fold_vs_ridgecv"] = {"sklearn_s": round(t_sk, 1), "ours_s": round(t_ours, 1),
                                   "ratio_sklearn_over_ours": round(t_sk / t_ours, 2),
                                   "same_penalties": float((ours.alpha == ref.alpha_).mean()),
                                   "max_rel_prediction_diff": float(np.abs(po - pr).max() / np.abs(pr).max())}
    t = time.perf_counter()
    for p in range(folds):
        tr = patient != p
        fit_ridge_heads(X[tr], Y[tr], dtype=np.float32).predict(X[~tr])
    lopo = time.perf_counter() - t
    res["spot_heads"] = {"spots": n, "genes": g, "dim": d, "folds": folds, "seconds": round(lopo, 1),
                         "seconds_per_fold": round(lopo / folds, 2)}
    if os.environ.get("SPOT_ONLY"):
        res["load_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(res, indent=1))
        return
    slides, tiles = 1000, 2000
    maps = [rng.random((tiles, 2)) < rng.random(2) for _ in range(slides)]
    side = int(np.ceil(np.sqrt(tiles)))
    t = time.perf_counter()
    out = []
    for B in maps:
        grid = np.zeros((side, side), np.int64)
        grid.flat[:tiles] = combination_codes(B)
        out.append(hti(B))
    res["hti_cartography_grids"] = {"slides": slides, "tiles_per_slide": tiles, "seconds": round(time.perf_counter() - t, 2)}
    import pandas as pd

    from hefeat.figures.spatial import SlideImage, trait_maps

    # the real cartography figure (H&E panel, one map per trait, combined map with legends) on a fake thumbnail
    img = SlideImage(np.full((side * 8, side * 8, 3), 230, np.uint8), 8 / 224, 0.5, "bench")
    xy = np.stack(np.divmod(np.arange(tiles), side), 1) * 224
    grid_tiles = pd.DataFrame({"x": xy[:, 1], "y": xy[:, 0], "size0": 224.0})
    with tempfile.TemporaryDirectory() as dd:
        t = time.perf_counter()
        for i in range(20):
            trait_maps(img, grid_tiles, {"A": maps[i][:, 0], "B": maps[i][:, 1]}, title="bench", out=f"{dd}/{i}.png")
        per = (time.perf_counter() - t) / 20
    res["cartography_png"] = {"seconds_per_slide": round(per, 3), "extrapolated_1000_slides_s": round(per * 1000, 1)}
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
