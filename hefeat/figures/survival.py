"""Kaplan–Meier curves the way a clinical paper draws them (lifelines estimates)."""

from __future__ import annotations

import numpy as np

from hefeat.figures.base import Out, category_colors, pyplot, save, wrap


def kaplan_meier(groups: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str, time_label: str,
                 out: Out = None, p_value: float | None = None, test: str = "log-rank") -> dict:
    """Survival curves with 95 % confidence bands, censor marks, numbers at risk and y from 0.

    groups: name -> (durations, event observed 0/1). Group sizes and events go in the legend.
    Returns each group's median survival time (inf when the curve never reaches 0.5).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 5.8))
    fitters, med = [], {}
    for (name, (t, e)), color in zip(groups.items(), category_colors(len(groups)), strict=True):
        t, e = np.asarray(t, float), np.asarray(e, int)
        km = KaplanMeierFitter(label=f"{name}: n = {len(t)}, {int(e.sum())} events, {len(t) - int(e.sum())} censored").fit(t, e)
        km.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.15, show_censors=True, color=color,
                                  censor_styles={"marker": "|", "ms": 8, "mew": 1.2})
        fitters.append(km)
        med[name] = float(km.median_survival_time_)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_ylabel("survival probability")
    ax.set_xlabel(time_label)
    ax.legend(fontsize=8, loc="lower left", title="shaded: 95 % CI;  | : censored", title_fontsize=8)
    if p_value is not None:
        ax.text(0.98, 0.97, f"{test} p = {p_value:.3g}", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    ax.set_title(wrap(title, 75), fontsize=10)
    add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], labels=list(groups), fig=fig)
    fig.tight_layout()
    info = {"median_survival": med, "ylim": tuple(float(v) for v in ax.get_ylim()),
            "groups": {k: {"n": len(t), "events": int(np.sum(e))} for k, (t, e) in groups.items()}}
    save(fig, out)
    return info
