"""Demo stages beyond tiling (extraction, models, exploration)."""

from __future__ import annotations

# The demo's encoder: a truncated ResNet-18 (256-d) so the demo runs in minutes on a laptop CPU.
# Random init (seeded) because no model hub is assumed reachable; pass --encoder/--weights for real runs.
DEMO_ENCODER = {"encoder": "resnet18", "layer": "layer3", "weights": "none"}


def later_stages(store, out: dict, data, *, encoder=None, say=print) -> dict:
    """Run the demo's later stages; returns extra summary fields."""
    from hefeat.extract.pipeline import run_extraction

    enc = dict(DEMO_ENCODER)
    if encoder:
        enc = {"encoder": encoder, "layer": None, "weights": "none"}
    lines = []
    say(f"[4] extracting features ({enc['encoder']}{' ' + enc['layer'] if enc['layer'] else ''}, weights {enc['weights']})")
    ex = run_extraction(store, tiling_id=out["tiling_id"], **enc)
    sp = run_extraction(store, tiling_id=out["spot_tiling_id"], **enc)
    res = {"extraction_id": ex.extra["extraction_id"], "spot_extraction_id": sp.extra["extraction_id"],
           "dim": ex.extra["dim"]}
    lines.append(f"Features: extraction {res['extraction_id']} ({ex.extra['dim']}-d, {ex.tiles + 0} new tiles at "
                 f"{ex.tiles_per_s:.0f} tiles/s), spot extraction {res['spot_extraction_id']}.")
    say("[5] per-gene ridge heads (EMO-average), 5-fold patient CV")
    from hefeat.learn.emo import GenesParams, fit_genes, predict_genes

    g = fit_genes(store, GenesParams(extraction_id=res["extraction_id"]), truth=data / "truth.json")
    predict_genes(store, g["model_id"], top=5)
    res.update({"genes_model_id": g["model_id"], "n_genes": g["n_genes"], "n_significant": g["n_significant"],
                "signal_recall": g["signal_recall"], "null_false_calls": g["null_false_calls"]})
    lines.append(f"Per-gene heads {g['model_id']}: {g['n_significant']} of {g['n_genes']} genes significant at FDR 0.05; "
                 f"found {g['signal_recall']:.0%} of the {g['n_signal_evaluated']} true signal genes, "
                 f"called {g['null_false_calls']} of {g['n_null_evaluated']} null genes.")
    res["lines"] = lines
    return res
