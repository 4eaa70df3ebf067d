"""Per-task heads, losses, evaluation and the frozen-feature baseline on the same folds.

Losses: regression targets are standardised per output on the fold's training samples (so one
network weighs every gene alike; the papers' per-gene networks needed no such choice), MSE over the
outputs kept by the training-set filter; binary labels: BCE with logits, masked where a sample has
no training label for an output; multi-class: cross-entropy. Evaluation follows each paper (held-out
data only): ST-Net per patient Pearson r and a sign test over patients; EMO per-gene Spearman over
samples (slide prediction = mean of its tiles), one-sided, BH; PathoMCH/receptors slide AUC with a
bootstrap CI (slide score = mean tile probability, and share of tiles called positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.finetune.targets import TaskData


@dataclass(frozen=True)
class FoldTargets:
    """Per-fold target scaling and the outputs trained (regression); identity for labels."""

    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray

    def to_dict(self) -> dict:
        """Arrays as lists (for fold records)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "mask": self.mask.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FoldTargets:
        """Inverse of to_dict."""
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32), np.asarray(d["mask"], bool))


def fold_targets(data: TaskData, train: np.ndarray, *, min_variance: float, standardize: bool) -> FoldTargets:
    """Scaling and kept outputs from the training samples only (EMO's variance filter for genes)."""
    n_out = len(data.outputs)
    if data.kind != "regression":
        return FoldTargets(np.zeros(n_out, np.float32), np.ones(n_out, np.float32), np.ones(n_out, bool))
    Y = data.train_targets[train].astype(np.float64)
    mean, std = Y.mean(0), Y.std(0)
    mask = np.ones(n_out, bool)
    if data.variance_filter:  # EMO: genes with training variance > min_variance (across samples)
        units = np.unique(data.unit_of[train])
        mask = data.unit_targets[units].var(0, ddof=1) > min_variance if len(units) > 1 else mask
    if not standardize:
        mean, std = np.zeros(n_out), np.ones(n_out)
    std = np.where(std > 1e-6, std, 1.0)
    return FoldTargets(mean.astype(np.float32), std.astype(np.float32), mask)


def loss(kind: str, out, target, ft: FoldTargets):
    """Training loss of a batch: out (B, n_out) logits/outputs, target (B, n_out or 1) with NaN = no label."""
    import torch
    import torch.nn.functional as F

    out = out.float()
    if kind == "regression":
        mean = torch.as_tensor(ft.mean, device=out.device)
        std = torch.as_tensor(ft.std, device=out.device)
        cols = torch.as_tensor(np.flatnonzero(ft.mask), device=out.device)
        z = (target - mean) / std
        return F.mse_loss(out[:, cols], z[:, cols])
    if kind == "binary":
        ok = ~torch.isnan(target)
        if not ok.any():
            return out.sum() * 0.0
        return F.binary_cross_entropy_with_logits(out[ok], target[ok])
    ok = ~torch.isnan(target[:, 0])
    if not ok.any():
        return out.sum() * 0.0
    return F.cross_entropy(out[ok], target[ok, 0].long())


def activate(kind: str, out, ft: FoldTargets) -> np.ndarray:
    """Predictions in target units (regression) or probabilities, as float64 numpy (B, n_out)."""
    import torch

    out = out.float()
    if kind == "regression":
        return (out.cpu().numpy().astype(np.float64) * ft.std + ft.mean)
    if kind == "binary":
        return torch.sigmoid(out).cpu().numpy().astype(np.float64)
    return torch.softmax(out, 1).cpu().numpy().astype(np.float64)


def output_bias(kind: str, data: TaskData, train: np.ndarray, ft: FoldTargets) -> np.ndarray:
    """Initial head bias: 0 in standardised units (= mean), log-odds / log-prior of the training labels."""
    n_out = len(data.outputs)
    T = data.train_targets[train]
    if kind == "regression":
        return ((T.mean(0) - ft.mean) / ft.std).astype(np.float32) if len(T) else np.zeros(n_out, np.float32)
    if kind == "binary":
        p = np.clip(np.nanmean(T, 0), 0.02, 0.98)
        return np.log(p / (1 - p)).astype(np.float32)
    counts = np.bincount(T[~np.isnan(T[:, 0]), 0].astype(int), minlength=n_out) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out samples (pooled out-of-fold predictions)
# ----------------------------------------------------------------------------------------------
def evaluate(task: str, data: TaskData, pred: np.ndarray, tested: np.ndarray, *, kept: np.ndarray,
             split: str, fdr: float = 0.05) -> tuple[dict, dict[str, pd.DataFrame]]:
    """(summary, tables) of out-of-fold predictions pred (n_samples, n_out) on the `tested` samples."""
    if task == "spots":
        return _eval_spots(data, pred, tested, kept, split)
    if task == "genes":
        return _eval_genes(data, pred, tested, kept, split, fdr)
    return _eval_classify(data, pred, tested, split)


def unit_means(data: TaskData, pred: np.ndarray, tested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(units, mean prediction per unit) over the tested samples."""
    u = data.unit_of[tested]
    df = pd.DataFrame(pred[tested]).groupby(u, sort=True).mean()
    return df.index.to_numpy(), df.to_numpy()


def _eval_spots(data: TaskData, pred, tested, kept, split):
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


def _eval_genes(data: TaskData, pred, tested, kept, split, fdr):
    from hefeat.learn.stats import columnwise_spearman, gene_metrics, r_pvalue

    units, up = unit_means(data, pred, tested)
    genes = [g for g, k in zip(data.outputs, kept, strict=True) if k]
    Y = data.unit_targets[units][:, kept]
    m = gene_metrics(up[:, kept], Y, genes, split=split)
    m["significant"] = m["spearman_p_bh"] < fdr
    summary = {"n_samples": len(units), "n_genes": len(genes), "n_significant": int(m["significant"].sum()),
               "n_r2_above_0.2": int((m["r2"] > 0.2).sum()), "median_spearman_r": _f(m["spearman_r"].median()),
               "split": split}
    from hefeat.learn.emo import ALIASES, PAM50_PROLIFERATION

    prol = [i for i, g in enumerate(genes) if ALIASES.get(g, g) in PAM50_PROLIFERATION]
    if len(prol) >= 3:
        r = float(columnwise_spearman(up[:, kept][:, prol].mean(1)[:, None], Y[:, prol].mean(1)[:, None])[0])
        summary.update(proliferation_spearman_r=r, proliferation_p=float(r_pvalue(np.array([r]), len(units))[0]))
    oof = pd.DataFrame(up[:, kept], columns=genes)
    oof.insert(0, "patient_id", data.units["patient_id"].to_numpy()[units])
    oof.insert(0, "sample_id", data.units["unit_id"].to_numpy()[units])
    return summary, {"metrics": m, "oof_predictions": oof}


def _eval_classify(data: TaskData, pred, tested, split):
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
    v = float(v)
    return v if np.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# The frozen baseline: a linear head on frozen features, on exactly the same folds
# ----------------------------------------------------------------------------------------------
def baseline_predict(task: str, data: TaskData, F: np.ndarray, train: np.ndarray, test: np.ndarray,
                     *, seed: int) -> np.ndarray:
    """Predictions (len(test), n_out) of the frozen-feature head fitted on `train` samples.

    spots: per-gene ridge on spot features (hefeat fit spots); genes: per-gene ridge on unit-mean
    features (hefeat fit genes, EMO-average); classify: logistic regression on tiles (fit traits).
    """
    from hefeat.learn.ridge import fit_ridge_heads

    n_out = len(data.outputs)
    if task == "spots":
        return fit_ridge_heads(F[train], data.train_targets[train]).predict(F[test])
    if task == "genes":
        tr_u = np.unique(data.unit_of[train])
        Xu = pd.DataFrame(F[train]).groupby(data.unit_of[train], sort=True).mean().loc[tr_u].to_numpy()
        te_u, inv = np.unique(data.unit_of[test], return_inverse=True)
        Xte = pd.DataFrame(F[test]).groupby(data.unit_of[test], sort=True).mean().loc[te_u].to_numpy()
        return fit_ridge_heads(Xu, data.unit_targets[tr_u]).predict(Xte)[inv]
    from hefeat.learn.classifiers import tile_classifier

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
