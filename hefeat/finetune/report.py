"""`hefeat report <job_id>` for fine-tuning jobs: learning curves, the paper-style headline, and the
frozen-vs-fine-tuned table on the same folds; `hefeat finetune status`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.finetune.heartbeat import job_state
from hefeat.store import layout
from hefeat.store.atomic import read_json
from hefeat.store.catalog import Store


def _n(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def headline(s: dict) -> str:
    """The sentence each paper reports, for this job's held-out predictions, with the frozen baseline."""
    task = s.get("task") or s["kind"].removeprefix("finetune-")
    frozen = "frozen_median_r" in s or any(k.startswith("frozen_") for k in s)
    if task == "spots":
        h = (f"{s['genes_passing_sign_test']} of {s['n_genes']} genes have r > 0 in enough of {s['n_patients']} held-out "
             f"patients (sign test, Holm; {s['split']}); median per-patient r {_n(s['median_r'])}")
        if frozen:
            h += (f" fine-tuned vs {_n(s.get('frozen_median_r'))} frozen ({s.get('frozen_genes_passing_sign_test')} genes "
                  f"pass) on the same folds")
        if s["n_patients"] < 5:  # 0.5 ** n: four patients all positive give p = 0.0625
            h += f" (with {s['n_patients']} held-out patients the sign test cannot reach p < 0.05: it needs 5)"
        return h
    if task == "genes":
        h = (f"{s['n_significant']} of {s['n_genes']} genes significant at FDR 0.05 (one-sided Spearman over "
             f"{s['n_samples']} held-out samples, slide = mean of its tiles; {s['split']}); {s['n_r2_above_0.2']} with "
             f"R² > 0.2")
        if "proliferation_spearman_r" in s:
            h += f"; proliferation score r = {s['proliferation_spearman_r']:.2f}"
        if frozen:
            h += f". Frozen features, same folds: {s.get('frozen_n_significant')} significant"
        if "cost_ratio_at_paper_genes" in s:
            h += (f". One network replaces {s['n_genes']} per-gene CNNs ({s['cost_ratio_per_gene_vs_one_network']:.0f}x "
                  f"fewer FLOPs; {s['cost_ratio_at_paper_genes']:.0f}x at the paper's 17,695 genes: "
                  f"~{s['paper_gpu_hours_as_one_network']:.0f} instead of 300,000 GPU-hours)")
        return h
    aucs = [k.removeprefix("auc_") for k in s if k.startswith("auc_") and not k.endswith(("_ci_low", "_ci_high"))]
    if aucs:
        parts = [f"{a} {_n(s[f'auc_{a}'])} (95 % CI {_n(s.get(f'auc_{a}_ci_low'))}-{_n(s.get(f'auc_{a}_ci_high'))}; "
                 f"frozen {_n(s.get(f'frozen_auc_{a}'))})" for a in aucs]
        return f"slide AUC on {s['n_slides']} held-out slides ({s['split']}): " + ", ".join(parts)
    return (f"top-1 {_n(s.get('top1'))}, top-2 {_n(s.get('top2'))} on {s['n_slides']} held-out slides "
            f"(frozen top-1 {_n(s.get('frozen_top1'))})")


def job_status(store: Store, jid: str) -> dict:
    """The job's state from its heartbeat (done / running / stopped); per fold: finished / trained up to a
    checkpoint / not started, epochs, best epoch, last losses."""
    p = layout.job_meta_path(store.root, jid)
    if not p.exists():
        raise HefeatError(f"No fine-tuning job {jid!r} in {store.root} (see: hefeat finetune list)")
    job = read_json(p)
    state, why = job_state(store.root, job)
    folds = []
    for f in job["folds"]:
        d = layout.fold_dir(store.root, jid, f["name"])
        hist = read_json(d / layout.FOLD_METRICS) if (d / layout.FOLD_METRICS).exists() else []
        fstate = ("finished" if (d / layout.FOLD_DONE).exists() else "not started" if not (d / layout.FOLD_LAST).exists()
                  else "training" if state == "running" else "interrupted (resumes from its checkpoint)")
        last = hist[-1] if hist else {}
        folds.append({"name": f["name"], "state": fstate, "epochs": len(hist), "best_epoch": last.get("best_epoch"),
                      "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss")})
    return {"job_id": jid, "task": job["task"], "status": job["status"], "state": state, "state_why": why,
            "backbone": job["recipe"]["backbone"], "split": job["split"], "folds": folds}


def report_job(store: Store, jid: str, out: str | Path | None = None) -> dict:
    """PNG learning curves and the frozen-vs-fine-tuned comparison; the headline and the table."""
    from hefeat.figures.metrics import comparison, learning_curves
    from hefeat.learn.models import load_model, load_table

    meta = load_model(store, jid)
    s = dict(meta["summary"])
    out = Path(out) if out else store.model_dir(jid) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    hist = load_table(store, jid, "history")
    cols = ["train_loss"] + (["val_loss"] if hist["val_loss"].notna().any() else [])
    one = hist["fold"].nunique() == 1
    p = out / "learning_curves.png"
    loss = "standardised targets, MSE" if s["task"] != "classify" else "cross-entropy"
    learning_curves(hist[["fold", "epoch", *cols]].astype({c: float for c in cols}), metrics=cols, out=p,
                    best=float(hist["best_epoch"].iloc[-1]) if one else None,
                    title=f"{jid}: {s['backbone']} fine-tuned ({s['kind']}), loss on {loss}, "
                          f"{hist['fold'].nunique()} fold(s) of {s['split']}")
    files.append(str(p))
    table = pd.DataFrame()
    if layout.model_table_path(store.root, jid, "frozen_vs_finetuned").exists():
        table = load_table(store, jid, "frozen_vs_finetuned")
        rows = _comparison_rows(s["task"], table)
        if len(rows):
            p = out / "frozen_vs_finetuned.png"
            metric = rows["metric"].iloc[0]
            ci = rows["lo"].notna().all()
            comparison(rows.rename(columns={"value": metric}), value=metric, label="name", group="model",
                       lo="lo" if ci else None, hi="hi" if ci else None, out=p,
                       title=f"{jid}: held-out {metric}, fine-tuned vs frozen, same folds",
                       reference=0.5 if s["task"] == "classify" else 0.0,
                       reference_label="chance" if s["task"] == "classify" else "r = 0")
            files.append(str(p))
    s["headline"] = headline(s)
    s["files"] = files
    s["frozen_vs_finetuned"] = table.head(50).to_dict("records")
    return s


def _comparison_rows(task: str, t: pd.DataFrame) -> pd.DataFrame:
    """Long rows (name, model, value, lo, hi, metric) for the comparison dot plot: the 20 best outputs."""
    if task == "classify" and "auc_mean_prob_finetuned" in t:
        t = t[t["slides"] == "all"]
        rows = [{"name": r["label"], "model": m, "value": r[f"auc_mean_prob_{k}"], "lo": r[f"ci_low_{k}"],
                 "hi": r[f"ci_high_{k}"], "metric": "slide AUC"}
                for _, r in t.iterrows() for m, k in (("fine-tuned", "finetuned"), ("frozen", "frozen"))]
        return pd.DataFrame(rows)
    col = "mean_r" if task == "spots" else "spearman_r"
    if f"{col}_finetuned" not in t:
        return pd.DataFrame()
    top = t.sort_values(f"{col}_finetuned", ascending=False).head(20)
    metric = "mean per-patient Pearson r" if task == "spots" else "Spearman r"
    rows = [{"name": r["gene"], "model": m, "value": r[f"{col}_{k}"], "lo": None, "hi": None, "metric": metric}
            for _, r in top.iterrows() for m, k in (("fine-tuned", "finetuned"), ("frozen", "frozen"))]
    return pd.DataFrame(rows)
