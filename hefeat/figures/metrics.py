"""Model-report figures: r distributions, predicted vs measured, ROC with CI, comparisons, learning curves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.figures.base import Out, category_colors, fmt, pyplot, save, wrap

NULL_MODE_NOTE = ("Genes without signal centre below r = 0: cross-validation predicts each held-out fold "
                  "from the other folds, whose mean moves opposite to the held-out fold's, so null "
                  "correlations are biased negative.")


def r_distribution(r: np.ndarray, *, metric: str, title: str, out: Out = None, r_null: np.ndarray | None = None,
                   threshold: float | None = None, threshold_label: str = "significance threshold") -> dict:
    """Histogram of held-out per-gene correlations, the permuted-target null and the significance line.

    r: (n_genes,) held-out correlations; r_null: the same statistic after permuting the targets (the
    null the tests compare with); threshold: smallest r called significant (drawn as a line).
    """
    r = np.asarray(r, float)
    r = r[np.isfinite(r)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lo = min(-0.5, float(np.min(r)) if r.size else -0.5)
    bins = np.linspace(lo, 1, 41)
    sig = r >= threshold if threshold is not None else np.zeros(len(r), bool)
    ax.hist([r[~sig], r[sig]], bins=bins, stacked=True, color=["#9e9e9e", "#7b3f9e"],
            label=[f"not significant ({int((~sig).sum())})", f"significant ({int(sig.sum())})"])
    if r_null is not None:
        rn = np.asarray(r_null, float)
        rn = rn[np.isfinite(rn)]
        w = np.full(len(rn), len(r) / max(len(rn), 1))
        ax.hist(rn, bins=bins, weights=w, histtype="step", color="k", lw=1.2, ls="--",
                label=f"permuted-target null (scaled to {len(r)} genes)")
    ax.axvline(0, color="k", lw=0.6)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#d32f2f", lw=1.5)
        ax.text(threshold, ax.get_ylim()[1] * 0.97, f" {threshold_label}: r = {threshold:.2f} ", color="#d32f2f",
                fontsize=8, va="top", ha="right", rotation=90, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
    ax.set_xlabel(f"{metric} on held-out data (per gene)")
    ax.set_ylabel("genes")
    ax.set_title(wrap(title, 75), fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.01, NULL_MODE_NOTE, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save(fig, out)
    return {"n": int(len(r)), "n_significant": int(sig.sum())}


def predicted_vs_measured(panels: list[dict], *, units: str, title: str, out: Out = None, ncols: int = 3) -> dict:
    """Scatter of predicted vs measured per panel with the identity line and equal axes.

    panels: dicts with name, measured, predicted (arrays) and stat (text such as 'r = 0.61').
    """
    plt = pyplot()
    n = len(panels)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows + 0.5), squeeze=False)
    for ax, p in zip(axes.ravel(), panels, strict=False):
        x, y = np.asarray(p["measured"], float), np.asarray(p["predicted"], float)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=10, color="#c2185b", alpha=0.7, edgecolors="none")
        both = np.concatenate([x[ok], y[ok]]) if ok.any() else np.array([0.0, 1.0])
        a, b = float(both.min()), float(both.max())
        pad = 0.05 * (b - a or 1)
        ax.plot([a - pad, b + pad], [a - pad, b + pad], color="k", lw=0.8, ls="--", label="identity (y = x)")
        ax.set_xlim(a - pad, b + pad)
        ax.set_ylim(a - pad, b + pad)
        ax.set_aspect("equal")
        ax.set_title(f"{p['name']}: {p.get('stat', '')}", fontsize=9)
        ax.set_xlabel(f"measured ({units})", fontsize=8)
        ax.set_ylabel(f"predicted ({units})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    axes.ravel()[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, out)
    return {"panels": n}


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn.metrics.roc_curve(y, s)'s (fpr, tpr) for 0/1 labels with both classes present, to the bit (the same
    sort, threshold grouping, collinear-point dropping and divisions) without its per-call input validation,
    which costs ~1 ms a call: 10x the arithmetic at bootstrap sizes."""
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    idx = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y == 1, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    if fps.shape[0] > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1]


def _bootstrap_roc(y: np.ndarray, s: np.ndarray, grid: np.ndarray, n_boot: int, seed: int):
    """AUCs and TPRs on `grid` of `n_boot` resamples (those with both classes), as roc_curve and roc_auc_score
    give them (_roc; AUC the trapezoid under that curve, as sklearn.metrics.auc computes it)."""
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        f, t = _roc(y[i], s[i])
        aucs.append(float(np.trapezoid(t, f)))
        tprs.append(np.interp(grid, f, t))
    return np.array(aucs), np.array(tprs)


def roc_curves(curves: list[dict], *, title: str, out: Out = None, n_boot: int = 500, seed: int = 0) -> dict:
    """ROC curves with AUC (95 % CI) and group sizes in the legend; chance diagonal drawn.

    Each curve is either {label, y_true, score} (curve, AUC and a bootstrap 95 % band computed here)
    or precomputed {label, fpr, tpr, auc, ci_low, ci_high, n_pos, n_neg}. Returns {label: (auc, lo, hi)}.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5.2))
    grid = np.linspace(0, 1, 101)
    res, banded = {}, False
    for c, color in zip(curves, category_colors(len(curves)), strict=True):
        name = c["label"]
        if "fpr" in c:
            f, t, auc = np.asarray(c["fpr"]), np.asarray(c["tpr"]), float(c["auc"])
            lo, hi, npos, nneg = c.get("ci_low", np.nan), c.get("ci_high", np.nan), c.get("n_pos"), c.get("n_neg")
        else:
            y, sc = np.asarray(c["y_true"]).astype(int), np.asarray(c["score"], float)
            npos, nneg = int(y.sum()), int(len(y) - y.sum())
            if npos == 0 or nneg == 0:
                res[name] = (float("nan"),) * 3
                continue
            f, t, _ = roc_curve(y, sc)
            auc = float(roc_auc_score(y, sc))
            aucs, tprs = _bootstrap_roc(y, sc, grid, n_boot, seed)
            lo, hi = np.percentile(aucs, [2.5, 97.5]) if len(aucs) else (np.nan, np.nan)
            if len(tprs):
                ax.fill_between(grid, *np.percentile(tprs, [2.5, 97.5], axis=0), color=color, alpha=0.15, lw=0)
                banded = True
        res[name] = (auc, float(lo), float(hi))
        ci = f" ({lo:.2f}–{hi:.2f})" if np.isfinite(lo) else ""
        size = f"; {npos} positive / {nneg} negative" if npos is not None else ""
        ax.plot(f, t, color=color, lw=1.6, label=f"{name}: AUC {auc:.2f}{ci}{size}")
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    sub = f"AUC with 95 % CI; bands: 95 % bootstrap ({n_boot} resamples)" if banded else "AUC with 95 % CI"
    ax.set_title(wrap(title, 60) + "\n" + sub, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, out)
    return res


def comparison(rows: pd.DataFrame, *, value: str, title: str, out: Out = None, reference: float | None = None,
               reference_label: str = "", lo: str | None = None, hi: str | None = None, label: str = "name",
               group: str | None = None) -> dict:
    """Dot plot of one statistic per row (e.g. AUC per representation) with CI bars and a reference line.

    rows: one row per item with columns `label`, `value`, optional `lo`/`hi` (CI) and `group` (colour).
    """
    plt = pyplot()
    df = rows.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(df) + 1.6))
    groups = list(dict.fromkeys(df[group])) if group else [None]
    colors = dict(zip(groups, category_colors(len(groups)), strict=True))
    y = np.arange(len(df))[::-1]
    for g in groups:
        m = (df[group] == g).to_numpy() if group else np.ones(len(df), bool)
        err = None
        if lo and hi:
            err = np.vstack([df.loc[m, value] - df.loc[m, lo], df.loc[m, hi] - df.loc[m, value]])
        ax.errorbar(df.loc[m, value], y[m], xerr=err, fmt="o", color=colors[g], capsize=3, label=g)
    for yi, v in zip(y, df[value], strict=True):
        ax.text(v, yi + 0.18, fmt(v), fontsize=7, ha="center")
    if reference is not None:
        ax.axvline(reference, color="k", ls="--", lw=0.8)
        ax.text(reference, len(df) - 0.4, f" {reference_label}", fontsize=7, va="bottom")
    ax.set_yticks(y, df[label])
    ax.set_ylim(-0.7, len(df) - 0.2)
    ax.set_xlabel(value + (" (95 % CI)" if lo and hi else ""))
    if group:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save(fig, out)
    return {"rows": len(df)}


def learning_curves(history: pd.DataFrame, *, title: str, out: Out = None, x: str = "epoch",
                    metrics: list[str] | None = None, best: float | None = None) -> dict:
    """Training curves: one line per metric (e.g. train_loss, val_loss) against `x`, best epoch marked.

    history: one row per (fold?, epoch) with numeric metric columns; with a `fold` column each fold is
    a thin line and the mean over folds a thick one. best: the x of the kept checkpoint (default: the
    minimum of the mean val_loss when present).
    """
    plt = pyplot()
    metrics = metrics or [c for c in history.columns if c not in (x, "fold") and pd.api.types.is_numeric_dtype(history[c])]
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    mean = history.groupby(x)[metrics].mean().reset_index()
    for m, color in zip(metrics, category_colors(len(metrics)), strict=True):
        if "fold" in history.columns:
            for _, g in history.groupby("fold"):
                ax.plot(g[x], g[m], color=color, lw=0.6, alpha=0.4)
        n_f = history["fold"].nunique() if "fold" in history.columns else 1
        ax.plot(mean[x], mean[m], color=color, lw=1.8, marker="o", ms=3,
                label=m.replace("_", " ") + (f" (mean of {n_f} folds; thin: each fold)" if n_f > 1 else ""))
    if best is None and "val_loss" in mean:
        best = float(mean.loc[mean["val_loss"].idxmin(), x])
    if best is not None:
        ax.axvline(best, color="k", ls="--", lw=0.8, label=f"kept checkpoint: {x} {fmt(best)}")
    ax.set_xlabel(x)
    ax.set_ylabel(", ".join(m.replace("_", " ") for m in metrics))
    ax.set_title(wrap(title, 70), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out)
    return {"metrics": metrics, "best": best}


def transfer_comparison(aucs: pd.DataFrame, *, title: str, out: Out = None, tests: pd.DataFrame | None = None,
                        x: str = "b_share", arm: str = "arm", value: str = "auc") -> dict:
    """AUC (or another score) of each arm against the training share of task B, over random splits.

    aucs: one row per (x, split, arm) with `value`; each split is a dot, the median a line with the
    interquartile band. tests: optional rows (x, comparison, wilcoxon_p, median_diff) printed under
    each x. Chance (0.5) is drawn.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    arms = list(dict.fromkeys(aucs[arm]))
    xs = sorted(aucs[x].unique())
    for k, (a_name, color) in enumerate(zip(arms, category_colors(len(arms)), strict=True)):
        d = aucs[aucs[arm] == a_name]
        q = d.groupby(x)[value].quantile([0.25, 0.5, 0.75]).unstack()
        jitter = (k - (len(arms) - 1) / 2) * 0.006 * (max(xs) - min(xs) or 1)
        ax.scatter(d[x] + jitter, d[value], s=10, color=color, alpha=0.5, edgecolors="none")
        n = int(d.groupby(x).size().min())
        ax.plot(q.index, q[0.5], color=color, lw=1.8, marker="o", ms=4, label=f"{a_name} (median of {n} splits)")
        ax.fill_between(q.index, q[0.25], q[0.75], color=color, alpha=0.15, lw=0)
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="chance (0.5)")
    note = ""
    if tests is not None and len(tests):
        parts = []
        for comp, g in tests.groupby("comparison", sort=False):
            parts.append(f"{comp}: " + ", ".join(f"{fmt(r[x])} → p = {r['wilcoxon_p']:.2g}" for _, r in g.iterrows()))
        note = "Wilcoxon signed-rank over splits, by " + x.replace("_", " ") + ": " + "; ".join(parts)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(f"{value.upper() if value == 'auc' else value} on held-out data")
    ax.set_title(wrap(title, 80) + "\nband: interquartile range over splits; dots: single splits", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    if note:
        fig.text(0.01, 0.01, wrap(note, 120), fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.07 if note else 0, 1, 1))
    save(fig, out)
    return {"arms": arms, "points": len(aucs)}
