"""`hefeat report`: the headline the way each paper reports it, and each method's plots (PNG).

The registry says what a model kind reports (its `headline` and `plots`); this module gathers the
data each figure needs from the stored model and calls the figure functions (hefeat.figures).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.learn.models import load_model, load_table
from hefeat.store import layout
from hefeat.store.catalog import Store


def report(store: Store, mid: str, out: str | Path | None = None) -> dict:
    """Write a model's PNG plots into `out` (default models/<id>/report) and return its summary and headline."""
    from hefeat.learn.registry import method_of

    m, meta = method_of(store, mid)
    if m.report is not None:
        return m.report(store, mid, out)
    out = Path(out) if out else layout.model_report_dir(store.root, mid)
    out.mkdir(parents=True, exist_ok=True)
    s = {**meta["summary"], "model_id": mid, "kind": m.name}
    s["headline"] = m.headline(s)
    files = m.plots(store, mid, out) if m.plots else []
    s["files"] = [str(f) for f in files]
    return s


# ----------------------------------------------------------------------------------------------
# Gene-level models (genes, he2rna)
# ----------------------------------------------------------------------------------------------
def gene_plots(store: Store, mid: str, out: Path) -> list[Path]:
    """Held-out r per gene, predicted vs measured for the best genes, the proliferation score."""
    from hefeat.figures.metrics import predicted_vs_measured, r_distribution

    meta = load_model(store, mid)
    m = load_table(store, mid, "metrics")
    files = []
    r_col = "spearman_r" if "spearman_r" in m else "pearson_r"
    sig = m[m["significant"]] if "significant" in m else m.iloc[:0]
    thr = float(sig[r_col].min()) if len(sig) else None
    fdr = meta["summary"].get("fdr", 0.05)
    null = load_table(store, mid, "null")[r_col].to_numpy() if "null" in meta.get("tables", []) else None
    split = meta.get("summary", {}).get("split", "cross-validation")
    files.append(out / layout.FIG_R_DISTRIBUTION)
    r_distribution(m[r_col].to_numpy(), metric=r_col.replace("_", " "), r_null=null, threshold=thr,
                   threshold_label=f"smallest r significant at FDR {fdr:g}",
                   title=f"Per-gene heads {mid} ({meta['kind']}): {len(sig)} of {len(m)} genes significant, {split}",
                   out=files[-1])
    oof_p = layout.model_table_path(store.root, mid, "oof_predictions")
    if oof_p.exists():
        import pyarrow.parquet as pq

        from hefeat.learn.genesets import ALIASES, PAM50_PROLIFERATION

        top = m.sort_values(r_col, ascending=False)["gene"].head(6).tolist()
        # Only the columns drawn (ids, the top genes, the proliferation genes): at 20,000 genes the whole
        # out-of-fold table is 1.6 GB and 6 s to read for a dozen columns.
        drawn = {"sample_id", *top}
        oof = pd.read_parquet(oof_p, columns=[c for c in pq.read_schema(oof_p).names
                                              if c in drawn or ALIASES.get(c, c) in PAM50_PROLIFERATION])
        truth = _measured(store, meta, oof)
        units = meta.get("params", {}).get("transform", "") + " expression"
        if truth is not None and top:
            rs = m.set_index("gene")[r_col]
            files.append(out / layout.FIG_TOP_GENES)
            rname = r_col.replace("_r", " r").replace("_", " ")
            predicted_vs_measured([{"name": g, "measured": truth[g], "predicted": oof[g], "stat": f"{rname} = {rs[g]:.2f}"}
                                   for g in top], units=units.strip(), out=files[-1],
                                  title=f"The {len(top)} genes with the highest held-out {r_col.replace('_', ' ')} of "
                                        f"{len(m)} (model {mid}; out-of-fold predictions)")
            prol = [g for g in oof.columns if ALIASES.get(g, g) in PAM50_PROLIFERATION]
            if len(prol) >= 3:
                files.append(out / layout.FIG_PROLIFERATION)
                from scipy.stats import spearmanr

                a, b = truth[prol].mean(1), oof[prol].mean(1)
                predicted_vs_measured([{"name": "proliferation score", "measured": a, "predicted": b,
                                        "stat": f"Spearman r = {spearmanr(a, b)[0]:.2f}"}],
                                      units=f"mean of {len(prol)} PAM50 genes", out=files[-1],
                                      title=f"Proliferation score, out-of-fold (model {mid})")
    return files


def _measured(store: Store, meta: dict, oof: pd.DataFrame) -> pd.DataFrame | None:
    """Measured (transformed) targets aligned with the out-of-fold table."""
    from hefeat.errors import HefeatError
    from hefeat.learn.data import sample_targets

    p = meta["params"]
    try:
        data = sample_targets(store, p["extraction_id"], dataset=p.get("dataset", "expression"),
                              transform=p.get("transform", "log1p"), level=p.get("unit", "sample"))
    except HefeatError:
        return None
    df = pd.DataFrame(data.Y, columns=data.genes, index=data.ids)
    return df.loc[oof["sample_id"].to_numpy()].reset_index(drop=True) if set(oof["sample_id"]) <= set(df.index) else None


# ----------------------------------------------------------------------------------------------
# Learning curves (he2rna, spots --head mlp)
# ----------------------------------------------------------------------------------------------
def learning_curve_plot(store: Store, mid: str, out: Path, table: str) -> list[Path]:
    """Training (and validation) loss per epoch of each fold's network, the mean over folds thick."""
    from hefeat.figures.metrics import learning_curves

    meta = load_model(store, mid)
    if table not in meta.get("tables", []):
        return []
    h = load_table(store, mid, table)
    if h.empty:
        return []
    cv = h[h["fold"] != "final"]
    f = out / layout.FIG_LEARNING_CURVES
    learning_curves(cv if len(cv) else h, out=f,
                    title=f"{meta['kind']} model {mid}: mean squared error per epoch in each cross-validation fold "
                          "(validation = patients held out of that fold's training for early stopping)")
    return [f]


# ----------------------------------------------------------------------------------------------
# ROC curves (receptors, traits)
# ----------------------------------------------------------------------------------------------
def roc_plot(store: Store, mid: str, out: Path) -> list[Path]:
    """Patient-level ROC with bootstrap bands for the test and validation sites (binary labels)."""
    from hefeat.figures.metrics import roc_curves

    meta = load_model(store, mid)
    s = meta["summary"]
    classes = s["classes"].split(",")
    if "patient_scores" not in meta.get("tables", []) or len(classes) != 2:
        return []
    sc = load_table(store, mid, "patient_scores")
    curves = [{"label": f"{part} sites" + (f" ({s['test_sites']})" if part == "test" else " (model choice)"),
               "y_true": g["y"].to_numpy(), "score": g[f"p_{classes[1]}"].to_numpy()}
              for part, g in sc.groupby("part", sort=False)]
    f = out / layout.FIG_ROC
    roc_curves(curves, out=f, seed=meta["params"].get("seed", 0), n_boot=meta["params"].get("n_boot", 500),
               title=f"{s['label']} = {classes[1]} per patient (mean tile probability), site-grouped split, model {mid}")
    return [f]


# ----------------------------------------------------------------------------------------------
# Transfer
# ----------------------------------------------------------------------------------------------
def transfer_plot(store: Store, mid: str, out: Path) -> list[Path]:
    """AUC of each representation per hospital-B size over the random A/B splits, Wilcoxon p under each size."""
    from hefeat.figures.metrics import transfer_comparison

    meta = load_model(store, mid)
    a = load_table(store, mid, "aucs")
    f = out / layout.FIG_TRANSFER
    transfer_comparison(a, tests=load_table(store, mid, "tests"), out=f,
                        title=f"{meta['summary']['label']} at hospital B: AUC ({meta['params']['folds']}-fold CV on B) "
                              f"over {a['split'].nunique()} random A/B patient splits per size (model {mid})")
    return [f]
