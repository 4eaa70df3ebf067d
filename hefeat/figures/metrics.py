"""Model-report figures: r distributions, predicted vs measured, ROC with CI, comparisons, learning curves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.figures.base import Out, category_colors, fmt, pyplot, save

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
        ax.text(threshold, ax.get_ylim()[1] * 0.97, f" {threshold_label}\n r = {threshold:.2f}", color="#d32f2f",
                fontsize=8, va="top", ha="left")
    ax.set_xlabel(f"{metric} on held-out data (per gene)")
    ax.set_ylabel("genes")
    ax.set_title(title, fontsize=10)
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


def _bootstrap_roc(y: np.ndarray, s: np.ndarray, grid: np.ndarray, n_boot: int, seed: int):
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        f, t, _ = roc_curve(y[i], s[i])
        aucs.append(roc_auc_score(y[i], s[i]))
        tprs.append(np.interp(grid, f, t))
    return np.array(aucs), np.array(tprs)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str, out: Out = None,
               n_boot: int = 500, seed: int = 0) -> dict:
    """ROC curves with bootstrap 95 % bands and AUC (95 % CI) in the legend; chance diagonal drawn.

    curves: name -> (y_true 0/1, score). Returns {name: (auc, ci_low, ci_high)}.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    grid = np.linspace(0, 1, 101)
    res = {}
    for (name, (y, s)), color in zip(curves.items(), category_colors(len(curves)), strict=True):
        y, s = np.asarray(y).astype(int), np.asarray(s, float)
        if len(np.unique(y)) < 2:
            res[name] = (float("nan"),) * 3
            continue
        f, t, _ = roc_curve(y, s)
        auc = float(roc_auc_score(y, s))
        aucs, tprs = _bootstrap_roc(y, s, grid, n_boot, seed)
        lo, hi = (np.percentile(aucs, [2.5, 97.5]) if len(aucs) else (np.nan, np.nan))
        res[name] = (auc, float(lo), float(hi))
        ax.plot(f, t, color=color, lw=1.6,
                label=f"{name}: AUC {auc:.2f} ({lo:.2f}–{hi:.2f}); n = {len(y)} ({int(y.sum())} positive)")
        if len(tprs):
            ax.fill_between(grid, *np.percentile(tprs, [2.5, 97.5], axis=0), color=color, alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title + f"\nbands: 95 % bootstrap CI ({n_boot} resamples)", fontsize=9)
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


def learning_curves(curves: dict[str, pd.DataFrame], *, x: str, y: str, title: str, out: Out = None,
                    best: dict[str, float] | None = None, ylabel: str | None = None) -> dict:
    """One line per curve (e.g. train and validation loss per epoch), best epoch marked.

    curves: name -> DataFrame with columns `x` and `y`; best: name -> x of the chosen checkpoint.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for (name, df), color in zip(curves.items(), category_colors(len(curves)), strict=True):
        ax.plot(df[x], df[y], color=color, lw=1.5, marker="o", ms=3, label=name)
        if best and name in best:
            b = df.loc[(df[x] - best[name]).abs().idxmin()]
            ax.plot([b[x]], [b[y]], marker="*", ms=12, color=color, mec="k",
                    label=f"{name}: chosen at {x} {fmt(b[x])} ({y} {fmt(b[y])})")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out)
    return {"curves": len(curves)}
