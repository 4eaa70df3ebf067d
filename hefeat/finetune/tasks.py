"""The fine-tuning tasks, one registration each: everything that differs between tasks is here.

A recipe's `task:` names a `Task`: its target loader (targets.py), its evaluation on held-out
samples as its paper reports it, the frozen-feature baseline on the same folds, the headline
sentence, the units of its per-tile outputs, the per-output metric (column and wording) that ranks
outputs and compares fine-tuned with frozen, and the prefix of its prediction columns. Recipe
validation, the job (job.py), its report and predictions, and the method registry (methods.py
registers a `finetune-<task>` kind per task) read the registration; nothing in finetune/ branches on
a task name. Adding a task is one `register_task(Task(...))`.

Evaluation follows each paper (held-out data only): ST-Net per patient Pearson r and a sign test over
patients; EMO per-gene Spearman over samples (slide prediction = mean of its tiles), one-sided, BH;
PathoMCH/receptors slide AUC with a bootstrap CI (slide score = mean tile probability, and share of
tiles called positive). Heads and losses depend on the head kind only (heads.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.finetune.targets import TaskData, load_classify, load_genes, load_spots

if TYPE_CHECKING:
    from hefeat.finetune.recipe import Recipe
    from hefeat.store.catalog import Store


def _regression(outputs: list[str]) -> str:
    return "regression"


@dataclass(frozen=True)
class Task:
    """A fine-tuning task.

    load(store, recipe) -> TaskData; evaluate(data, pred, tested, split, *, kept, fdr) -> (summary,
    tables with a `metrics` table: one row per output, named by `output_col`); baseline(data, F, train,
    test, *, seed) -> frozen-feature predictions (len(test), n_out); headline(summary) -> the paper's
    sentence; units(params, column) -> units of a prediction column; metric / metric_label: the
    per-output column of `metrics` that ranks outputs, and how plots name it; compare: the columns
    compared fine-tuned vs frozen (metric first); subsets: columns splitting an output's rows (the
    comparison plot shows their 'all' rows); ci: (low, high) columns of the metric's interval;
    top_outputs: predictions keep the best `top` outputs by metric (else every output); prefix:
    prediction column = prefix + output; labels: the recipe takes `labels` (else it must not);
    predicts: what it predicts, in words; head(outputs) -> head kind of a stored job's outputs
    (regression | binary | multiclass); loss_label: the loss, for the learning curves; reference:
    (value, label) of the no-skill line; extra_summary(recipe, n_kept_outputs, fold_results) -> more
    summary keys (or None).
    """

    name: str
    summary: str
    predicts: str
    load: Callable[[Store, Recipe], TaskData]
    evaluate: Callable[..., tuple[dict, dict[str, pd.DataFrame]]]
    baseline: Callable[..., np.ndarray]
    headline: Callable[[dict], str]
    units: Callable[[dict, str], str]
    output_col: str
    metric: str
    metric_label: str
    compare: tuple[str, ...]
    subsets: tuple[str, ...] = ()
    ci: tuple[str, str] | None = None
    top_outputs: bool = True
    prefix: str = ""
    labels: bool = False
    head: Callable[[list[str]], str] = _regression
    loss_label: str = "standardised targets, MSE"
    reference: tuple[float, str] = (0.0, "r = 0")
    extra_summary: Callable[..., dict] | None = None

    def prediction_outputs(self, outputs: list[str], metrics: pd.DataFrame, top: int) -> list[str]:
        """The outputs written as prediction columns: the `top` best by metric, or every output."""
        if not self.top_outputs:
            return list(outputs)
        return metrics.sort_values(self.metric, ascending=False)[self.output_col].head(top).tolist()

    def compare_tables(self, fine: pd.DataFrame, frozen: pd.DataFrame) -> pd.DataFrame:
        """Per output: the `compare` columns fine-tuned vs frozen on the same folds, and the metric's difference.

        A metrics table without per-output rows (multi-class: one row of top-1/top-2) is stacked instead.
        """
        key = [self.output_col, *self.subsets]
        if not set(key) <= set(fine.columns):
            return pd.concat([fine.assign(model="fine-tuned"), frozen.assign(model="frozen")], ignore_index=True)
        cols = list(self.compare)
        out = fine[key + cols].merge(frozen[key + cols], on=key, suffixes=("_finetuned", "_frozen"))
        first = cols[0]
        out[f"{first}_difference"] = out[f"{first}_finetuned"] - out[f"{first}_frozen"]
        return out

    def comparison_rows(self, t: pd.DataFrame) -> pd.DataFrame:
        """Long rows (name, model, value, lo, hi, metric) for the comparison dot plot (the 20 best outputs)."""
        fine = f"{self.metric}_finetuned"
        if fine not in t:
            return pd.DataFrame()
        for c in self.subsets:
            t = t[t[c] == "all"]
        if self.top_outputs:
            t = t.sort_values(fine, ascending=False).head(20)
        lo, hi = self.ci or (None, None)
        rows = [{"name": r[self.output_col], "model": m, "value": r[f"{self.metric}_{k}"],
                 "lo": r[f"{lo}_{k}"] if lo else None, "hi": r[f"{hi}_{k}"] if hi else None,
                 "metric": self.metric_label}
                for _, r in t.iterrows() for m, k in (("fine-tuned", "finetuned"), ("frozen", "frozen"))]
        return pd.DataFrame(rows)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task; recipes, jobs, reports and `hefeat predict` find it by name."""
    _TASKS[task.name] = task
    return task


def tasks() -> dict[str, Task]:
    """Every registered task by name (the built-ins are registered at the end of this module)."""
    return dict(_TASKS)


def get_task(name: str) -> Task:
    """The task registered under `name` (a job's summary names it as `task` or kind `finetune-<task>`)."""
    t = _TASKS.get(name)
    if t is None:
        raise HefeatError(f"Unknown fine-tuning task {name!r}; use one of {', '.join(_TASKS)}")
    return t


def load_task(store: Store, r: Recipe) -> TaskData:
    """TaskData for a recipe (its task's loader); clear errors when targets, labels or tiles are missing."""
    return get_task(r.task).load(store, r)


def _all_kept(data: TaskData, kept) -> np.ndarray:
    return np.ones(len(data.outputs), bool) if kept is None else np.asarray(kept, bool)


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out samples (pooled out-of-fold predictions)
# ----------------------------------------------------------------------------------------------
def unit_means(data: TaskData, pred: np.ndarray, tested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(units, mean prediction per unit) over the tested samples."""
    u = data.unit_of[tested]
    df = pd.DataFrame(pred[tested]).groupby(u, sort=True).mean()
    return df.index.to_numpy(), df.to_numpy()


def _eval_spots(data: TaskData, pred, tested, split, *, kept=None, fdr: float = 0.05):
    kept = _all_kept(data, kept)
    from hefeat.learn.stats import columnwise_pearson, correct, sign_test

    genes = [g for g, k in zip(data.outputs, kept, strict=True) if k]
    P, Y = pred[:, kept], data.train_targets[:, kept].astype(np.float64)
    pats = data.samples["patient_id"].to_numpy().astype(str)
    rows = []
    for pat in np.unique(pats[tested]):
        m = tested & (pats == pat)
        if m.sum() < 3:
            continue
        rows.append(pd.DataFrame({"gene": genes, "patient_id": pat, "n_spots": int(m.sum()),
                                  "r": columnwise_pearson(P[m], Y[m]), "rmse": np.sqrt(((P[m] - Y[m]) ** 2).mean(0))}))
    per = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["gene", "patient_id", "n_spots", "r", "rmse"])
    g = per.groupby("gene", sort=False)
    out = pd.DataFrame({"gene": genes}).set_index("gene")
    out["n_patients"] = g["r"].count()
    out["n_positive"] = g["r"].apply(lambda r: int((r > 0).sum()))
    out["mean_r"] = g["r"].mean()
    out["mean_rmse"] = g["rmse"].mean()
    out = out.fillna({"n_patients": 0, "n_positive": 0})
    out["sign_p"] = [sign_test(int(a), int(n)) for a, n in zip(out["n_positive"], out["n_patients"], strict=True)]
    out["sign_p_holm"] = correct(out["sign_p"].to_numpy(), "holm")
    out["works"] = out["sign_p_holm"] < 0.05
    out["split"] = split
    out = out.reset_index()
    summary = {"n_spots": int(tested.sum()), "n_patients": int(per["patient_id"].nunique()), "n_genes": len(genes),
               "genes_passing_sign_test": int(out["works"].sum()), "median_r": _f(out["mean_r"].median()),
               "split": split}
    return summary, {"metrics": out, "per_patient": per}


def _eval_genes(data: TaskData, pred, tested, split, *, kept=None, fdr: float = 0.05):
    kept = _all_kept(data, kept)
    from hefeat.learn.stats import columnwise_spearman, gene_metrics, r_pvalue

    units, up = unit_means(data, pred, tested)
    genes = [g for g, k in zip(data.outputs, kept, strict=True) if k]
    Y = data.unit_targets[units][:, kept]
    m = gene_metrics(up[:, kept], Y, genes, split=split)
    m["significant"] = m["spearman_p_bh"] < fdr
    summary = {"n_samples": len(units), "n_genes": len(genes), "n_significant": int(m["significant"].sum()),
               "n_r2_above_0.2": int((m["r2"] > 0.2).sum()), "median_spearman_r": _f(m["spearman_r"].median()),
               "split": split}
    from hefeat.learn.genesets import ALIASES, PAM50_PROLIFERATION

    prol = [i for i, g in enumerate(genes) if ALIASES.get(g, g) in PAM50_PROLIFERATION]
    if len(prol) >= 3:
        r = float(columnwise_spearman(up[:, kept][:, prol].mean(1)[:, None], Y[:, prol].mean(1)[:, None])[0])
        summary.update(proliferation_spearman_r=r, proliferation_p=float(r_pvalue(np.array([r]), len(units))[0]))
    oof = pd.DataFrame(up[:, kept], columns=genes)
    oof.insert(0, "patient_id", data.units["patient_id"].to_numpy()[units])
    oof.insert(0, "sample_id", data.units["unit_id"].to_numpy()[units])
    return summary, {"metrics": m, "oof_predictions": oof}


def _eval_classify(data: TaskData, pred, tested, split, *, kept=None, fdr: float = 0.05):
    from hefeat.learn.stats import auc_with_ci

    units, up = unit_means(data, pred, tested)
    frac = pd.DataFrame(pred[tested] > 0.5).groupby(data.unit_of[tested], sort=True).mean().to_numpy()
    U = data.unit_targets[units]
    ids = data.units["unit_id"].to_numpy()[units]
    summary: dict = {"n_slides": len(units), "split": split}
    rows = []
    if data.kind == "multiclass":
        ok = ~np.isnan(U[:, 0])
        y = U[ok, 0].astype(int)
        rank = np.argsort(-up[ok], 1)
        summary.update(top1=_f((rank[:, 0] == y).mean()), top2=_f((rank[:, :2] == y[:, None]).any(1).mean()))
        table = pd.DataFrame(up, columns=data.outputs).assign(slide_id=ids, label=U[:, 0])
        return summary, {"metrics": pd.DataFrame([summary]), "slide_scores": table}
    trained = ~np.isnan(data.train_targets)  # a unit is "extreme" (in-distribution) if its label trains
    in_dist = pd.DataFrame(trained).groupby(data.unit_of, sort=True).any().reindex(units).to_numpy()
    pats = data.units["patient_id"].to_numpy(str)[units]
    for j, name in enumerate(data.outputs):
        ok = ~np.isnan(U[:, j]) & np.isfinite(up[:, j])  # no score: that fold's training had one class only
        for subset, sel in (("all", ok), ("in_distribution", ok & in_dist[:, j])):
            if subset == "in_distribution" and sel.sum() == ok.sum():
                continue
            a = auc_with_ci(U[sel, j], up[sel, j], n_boot=500, seed=0, groups=pats[sel])  # resample patients
            b = auc_with_ci(U[sel, j], frac[sel, j], n_boot=0, seed=0)
            rows.append({"label": name, "slides": subset, "n": int(sel.sum()), "auc_mean_prob": a["auc"],
                         "ci_low": a["ci_low"], "ci_high": a["ci_high"], "auc_fraction_positive": b["auc"],
                         "split": split})
            if subset == "all":
                summary.update({f"auc_{name}": _f(a["auc"]), f"auc_{name}_ci_low": _f(a["ci_low"]),
                                f"auc_{name}_ci_high": _f(a["ci_high"])})
    scores = pd.DataFrame(up, columns=[f"p_{o}" for o in data.outputs]).assign(slide_id=ids)
    for j, o in enumerate(data.outputs):
        scores[f"label_{o}"] = U[:, j]
        scores[f"fraction_positive_{o}"] = frac[:, j]
    return summary, {"metrics": pd.DataFrame(rows), "slide_scores": scores}


def _f(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# The frozen baseline: a linear head on frozen features, on exactly the same folds
# ----------------------------------------------------------------------------------------------
def _baseline_spots(data: TaskData, F: np.ndarray, train: np.ndarray, test: np.ndarray, *, seed: int) -> np.ndarray:
    """Per-gene ridge on spot features (hefeat fit spots)."""
    from hefeat.learn.ridge import fit_ridge_heads

    return fit_ridge_heads(F[train], data.train_targets[train]).predict(F[test])


def _baseline_genes(data: TaskData, F: np.ndarray, train: np.ndarray, test: np.ndarray, *, seed: int) -> np.ndarray:
    """Per-gene ridge on unit-mean features (hefeat fit genes, EMO-average), predicted for each test sample's unit."""
    from hefeat.learn.ridge import fit_ridge_heads

    tr_u = np.unique(data.unit_of[train])
    Xu = pd.DataFrame(F[train]).groupby(data.unit_of[train], sort=True).mean().loc[tr_u].to_numpy()
    te_u, inv = np.unique(data.unit_of[test], return_inverse=True)
    Xte = pd.DataFrame(F[test]).groupby(data.unit_of[test], sort=True).mean().loc[te_u].to_numpy()
    return fit_ridge_heads(Xu, data.unit_targets[tr_u]).predict(Xte)[inv]


def _baseline_classify(data: TaskData, F: np.ndarray, train: np.ndarray, test: np.ndarray, *, seed: int) -> np.ndarray:
    """Logistic regression on tiles (fit traits), per label (or one multi-class model)."""
    from hefeat.learn.classifiers import tile_classifier

    n_out = len(data.outputs)
    out = np.full((len(test), n_out), np.nan)
    cols = [0] if data.kind == "multiclass" else range(n_out)
    for j in cols:
        y = data.train_targets[train, j]
        ok = ~np.isnan(y)
        if len(np.unique(y[ok])) < 2:
            continue
        clf = tile_classifier("logistic", C=0.05, seed=seed, max_iter=2000).fit(F[train][ok], y[ok].astype(int))
        p = clf.predict_proba(F[test])
        if data.kind == "multiclass":
            out[:] = 0.0
            out[:, clf.classes_.astype(int)] = p
        else:
            out[:, j] = p[:, 1]
    return out


# ----------------------------------------------------------------------------------------------
# Headlines, units and the rest of each task's wording
# ----------------------------------------------------------------------------------------------
def _n(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _frozen(s: dict) -> bool:
    return "frozen_median_r" in s or any(k.startswith("frozen_") for k in s)


def _headline_spots(s: dict) -> str:
    h = (f"{s['genes_passing_sign_test']} of {s['n_genes']} genes have r > 0 in enough of {s['n_patients']} held-out "
         f"patients (sign test, Holm; {s['split']}); median per-patient r {_n(s['median_r'])}")
    if _frozen(s):
        h += (f" fine-tuned vs {_n(s.get('frozen_median_r'))} frozen ({s.get('frozen_genes_passing_sign_test')} genes "
              f"pass) on the same folds")
    if s["n_patients"] < 5:  # 0.5 ** n: four patients all positive give p = 0.0625
        h += f" (with {s['n_patients']} held-out patients the sign test cannot reach p < 0.05: it needs 5)"
    return h


def _headline_genes(s: dict) -> str:
    h = (f"{s['n_significant']} of {s['n_genes']} genes significant at FDR 0.05 (one-sided Spearman over "
         f"{s['n_samples']} held-out samples, slide = mean of its tiles; {s['split']}); {s['n_r2_above_0.2']} with "
         f"R² > 0.2")
    if "proliferation_spearman_r" in s:
        h += f"; proliferation score r = {s['proliferation_spearman_r']:.2f}"
    if _frozen(s):
        h += f". Frozen features, same folds: {s.get('frozen_n_significant')} significant"
    if "cost_ratio_at_paper_genes" in s:
        h += (f". One network replaces {s['n_genes']} per-gene CNNs ({s['cost_ratio_per_gene_vs_one_network']:.0f}x "
              f"fewer FLOPs; {s['cost_ratio_at_paper_genes']:.0f}x at the paper's 17,695 genes: "
              f"~{s['paper_gpu_hours_as_one_network']:.0f} instead of 300,000 GPU-hours)")
    return h


def _headline_classify(s: dict) -> str:
    aucs = [k.removeprefix("auc_") for k in s if k.startswith("auc_") and not k.endswith(("_ci_low", "_ci_high"))]
    if aucs:
        parts = [f"{a} {_n(s[f'auc_{a}'])} (95 % CI {_n(s.get(f'auc_{a}_ci_low'))}-{_n(s.get(f'auc_{a}_ci_high'))}; "
                 f"frozen {_n(s.get(f'frozen_auc_{a}'))})" for a in aucs]
        return f"slide AUC on {s['n_slides']} held-out slides ({s['split']}): " + ", ".join(parts)
    return (f"top-1 {_n(s.get('top1'))}, top-2 {_n(s.get('top2'))} on {s['n_slides']} held-out slides "
            f"(frozen top-1 {_n(s.get('frozen_top1'))})")


def _units_spots(params: dict, column: str) -> str:
    from hefeat.learn.spots import TARGET_UNITS

    return f"predicted {TARGET_UNITS}"


def _units_genes(params: dict, column: str) -> str:
    from hefeat.learn.emo import expression_units

    return expression_units(params, column)


def _units_classify(params: dict, column: str) -> str:
    return f"predicted probability of {column.removeprefix('p_')}" if column.startswith("p_") else "model output"


def _head_classify(outputs: list[str]) -> str:
    return "multiclass" if "=" in outputs[0] else "binary"


def _emo_cost(r: Recipe, genes: int, results: dict) -> dict:
    """EMO's per-gene CNNs vs this one network: FLOPs counted on the backbone, throughput measured here."""
    from hefeat.finetune.cost import emo_cost, forward_flops
    from hefeat.finetune.train import build_net

    net, cfg = build_net(r, 1)
    flops = forward_flops(net.backbone, cfg.input_size[0])
    hist = pd.concat([pd.DataFrame(v["history"]) for v in results.values()])
    per_net = float(np.mean([v["steps"] for v in results.values()])) * r.batch_size
    return emo_cost(flops, cfg.dim, genes, images_per_s=_f(hist["images_per_s"].median()), images_per_network=per_net)


# ----------------------------------------------------------------------------------------------
# The built-in tasks
# ----------------------------------------------------------------------------------------------
register_task(Task(
    name="spots", summary="ST-Net: spot patches -> log-normalised counts of the selected genes",
    predicts="expression", load=load_spots, evaluate=_eval_spots, baseline=_baseline_spots,
    headline=_headline_spots, units=_units_spots, output_col="gene", metric="mean_r",
    metric_label="mean per-patient Pearson r", compare=("mean_r", "n_positive", "works")))
register_task(Task(
    name="genes", summary="EMO: tiles with their sample's bulk expression, one output per gene",
    predicts="expression", load=load_genes, evaluate=_eval_genes, baseline=_baseline_genes,
    headline=_headline_genes, units=_units_genes, output_col="gene", metric="spearman_r",
    metric_label="Spearman r", compare=("spearman_r", "r2", "significant"), extra_summary=_emo_cost))
register_task(Task(
    name="classify", summary="PathoMCH/receptors: tiles with their slide's label",
    predicts="slide labels", load=load_classify, evaluate=_eval_classify, baseline=_baseline_classify,
    headline=_headline_classify, units=_units_classify, output_col="label", metric="auc_mean_prob",
    metric_label="slide AUC", compare=("auc_mean_prob", "ci_low", "ci_high", "auc_fraction_positive"),
    subsets=("slides",), ci=("ci_low", "ci_high"), top_outputs=False, prefix="p_", labels=True,
    head=_head_classify, loss_label="cross-entropy", reference=(0.5, "chance")))
