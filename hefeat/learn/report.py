"""`hefeat report`: metric tables, PNG plots and the headline the way each paper reports it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.learn.models import load_model, load_table
from hefeat.store.catalog import Store


def report(store: Store, mid: str, out: str | Path | None = None) -> dict:
    """Write PNG plots for a model into `out` (default models/<id>/report) and return its headline."""
    meta = load_model(store, mid)
    kind = meta["kind"]
    if kind.startswith("finetune-"):  # fine-tuning jobs (hefeat.finetune); moves into the method registry
        from hefeat.finetune.report import report_job

        return report_job(store, mid, out)
    out = Path(out) if out else store.model_dir(mid) / "report"
    out.mkdir(parents=True, exist_ok=True)
    s = dict(meta["summary"])
    files = []
    if kind in ("genes", "he2rna"):
        files += _gene_plots(store, mid, out, meta)
        s["headline"] = (f"{s['n_significant']} of {s['n_genes']} genes significant at FDR 0.05 "
                         f"(one-sided, {s['split']}); {s.get('n_r2_above_0.2', 'n/a')} genes with R² > 0.2")
        if "proliferation_spearman_r" in s:
            s["headline"] += f"; proliferation score Spearman r = {s['proliferation_spearman_r']:.2f}"
    elif kind == "spots":
        s["headline"] = (f"{s['genes_passing_sign_test']} of {s['n_genes']} genes have r > 0 in enough of "
                         f"{s['n_patients']} patients (binomial sign test, Holm; leave-one-patient-out); median r "
                         f"{s['median_r_model']:.3f} vs colour/texture baseline {s['median_r_qc_baseline']:.3f}")
    elif kind == "traits":
        aucs = {k.removeprefix("heldout_auc_"): v for k, v in s.items() if k.startswith("heldout_auc_")}
        s["headline"] = "slide AUC on held-out slides (test + OOD): " + ", ".join(f"{t} {v:.3f}" for t, v in aucs.items())
    elif kind == "receptors":
        if "patient_auc_ci_low" in s:
            s["headline"] = (f"{s['label']}: patient AUC {s['patient_auc']:.3f} (95 % CI {s['patient_auc_ci_low']:.3f}-"
                             f"{s['patient_auc_ci_high']:.3f}) on test sites {s['test_sites']}")
        else:
            s["headline"] = f"{s['label']}: top-1 {s['top1']:.3f}, top-2 {s['top2']:.3f} on test sites {s['test_sites']}"
    elif kind == "transfer":
        s["headline"] = f"{s['label']}: " + ", ".join(f"{k.removeprefix('auc_')} {v:.3f}" for k, v in s.items()
                                                       if k.startswith("auc_")) + f"; min Wilcoxon p {s['min_wilcoxon_p']:.3g}"
    else:
        s.setdefault("headline", f"{kind} model {mid}")
    s["files"] = [str(f) for f in files]
    return s


def _gene_plots(store: Store, mid: str, out: Path, meta: dict) -> list[Path]:
    from hefeat.figures.metrics import predicted_vs_measured, r_distribution

    d = store.model_dir(mid)
    m = load_table(store, mid, "metrics")
    files = []
    r_col = "spearman_r" if "spearman_r" in m else "pearson_r"
    sig = m[m["significant"]] if "significant" in m else m.iloc[:0]
    thr = float(sig[r_col].min()) if len(sig) else None
    null = load_table(store, mid, "null")[r_col].to_numpy() if "null" in meta.get("tables", []) else None
    split = meta.get("summary", {}).get("split", "cross-validation")
    files.append(out / "r_distribution.png")
    r_distribution(m[r_col].to_numpy(), metric=r_col.replace("_", " "), r_null=null, threshold=thr,
                   threshold_label="smallest r significant at FDR 0.05",
                   title=f"{meta['kind']} model {mid}: {len(sig)} of {len(m)} genes significant ({split})",
                   out=files[-1])
    oof_p = d / "oof_predictions.parquet"
    if oof_p.exists():
        oof = pd.read_parquet(oof_p)
        truth = _measured(store, meta, oof)
        top = m.sort_values(r_col, ascending=False)["gene"].head(6).tolist()
        units = meta.get("params", {}).get("transform", "") + " expression"
        if truth is not None and top:
            rs = m.set_index("gene")[r_col]
            files.append(out / "top_genes.png")
            predicted_vs_measured([{"name": g, "measured": truth[g], "predicted": oof[g], "stat": f"r = {rs[g]:.2f}"}
                                   for g in top], units=units.strip(), out=files[-1],
                                  title=f"The {len(top)} genes with the highest held-out {r_col.replace('_', ' ')} of "
                                        f"{len(m)} (model {mid}; out-of-fold predictions)")
            from hefeat.learn.emo import ALIASES, PAM50_PROLIFERATION

            prol = [g for g in oof.columns if ALIASES.get(g, g) in PAM50_PROLIFERATION]
            if len(prol) >= 3:
                files.append(out / "proliferation.png")
                from scipy.stats import spearmanr

                a, b = truth[prol].mean(1), oof[prol].mean(1)
                predicted_vs_measured([{"name": "proliferation score", "measured": a, "predicted": b,
                                        "stat": f"Spearman r = {spearmanr(a, b)[0]:.2f}"}],
                                      units=f"mean of {len(prol)} PAM50 genes", out=files[-1],
                                      title=f"Proliferation score, out-of-fold (model {mid})")
    return files


def _measured(store: Store, meta: dict, oof: pd.DataFrame) -> pd.DataFrame | None:
    """Measured (transformed) targets aligned with the out-of-fold table."""
    from hefeat.learn.data import slide_level_data

    p = meta["params"]
    try:
        data = slide_level_data(store, p["extraction_id"], dataset=p.get("dataset", "expression"),
                                transform=p.get("transform", "log1p"))
    except Exception:
        return None
    df = pd.DataFrame(data.Y, columns=data.genes, index=data.ids)
    return df.loc[oof["sample_id"].to_numpy()].reset_index(drop=True) if set(oof["sample_id"]) <= set(df.index) else None

