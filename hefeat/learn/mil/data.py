"""What MIL learns from: the labelled slides with features grouped into bags (patients or slides), their
targets, and the per-slide aggregates (tile moments for standardising, mean-pooled bags for the baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.mil.params import MilParams
from hefeat.learn.registry import NotEstimable
from hefeat.store.catalog import Store


@dataclass
class Targets:
    """Per-bag targets of one task: y (classes / values / bins), time and event (survival)."""

    task: str
    y: np.ndarray
    classes: list[str]
    time: np.ndarray | None = None
    event: np.ndarray | None = None


def _bag_table(store: Store, p: MilParams) -> tuple[pd.DataFrame, str]:
    """Labelled slides with features: slide_id, patient_id, site and target columns; and the bag level."""
    from hefeat.learn.data import clinical_by_slide, finished_slides

    clin = clinical_by_slide(store)
    cols = [p.time_col, p.event_col] if p.task == "survival" else [p.label]
    for c in cols:
        if c not in clin.columns:
            raise HefeatError(f"Column {c!r} is not in the clinical or slides table; have: "
                              f"{', '.join(sorted(map(str, clin.columns)))}")
    df = clin[list(dict.fromkeys(["slide_id", "patient_id", "site", *cols]))].dropna(subset=cols)
    df = df[df["slide_id"].isin(set(finished_slides(store, p.extraction_id)))].sort_values("slide_id")
    if df.empty:
        raise NotEstimable(f"No slide with features in extraction {p.extraction_id} has a value of {', '.join(cols)}")
    df = df.reset_index(drop=True)
    same = (df.groupby("patient_id")[cols].nunique() <= 1).all(axis=None)
    level = p.level if p.level != "auto" else ("patient" if same else "slide")
    if level == "patient" and not same:
        raise HefeatError(f"Some patients' slides disagree on {', '.join(cols)}: a patient bag needs one value; "
                          "use --level slide")
    return df, level


def _targets(df: pd.DataFrame, p: MilParams) -> Targets:
    if p.task == "classification":
        raw = df[p.label]
        classes = sorted(raw.astype(str).unique())
        if len(classes) < 2:
            raise NotEstimable(f"Label {p.label!r} has one class only ({classes[0]}) among slides with features")
        return Targets("classification", raw.astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(), classes)
    if p.task == "regression":
        y = pd.to_numeric(df[p.label], errors="coerce").to_numpy(float)
        if not np.isfinite(y).all():
            raise HefeatError(f"--task regression needs a numeric {p.label!r}; it holds non-numbers")
        if np.ptp(y) == 0:
            raise NotEstimable(f"{p.label!r} is constant: nothing to regress")
        return Targets("regression", y, [])
    t = pd.to_numeric(df[p.time_col], errors="coerce").to_numpy(float)
    e = pd.to_numeric(df[p.event_col], errors="coerce").to_numpy(float)
    if not (np.isfinite(t).all() and np.isin(e, (0, 1)).all()):
        raise HefeatError(f"Survival needs numeric {p.time_col!r} and a 0/1 {p.event_col!r}")
    if e.sum() == 0:
        raise NotEstimable(f"{p.event_col!r} holds no event among {len(e)} bags: survival cannot be estimated; "
                           "use a column with events (1 = event)")
    return Targets("survival", np.zeros(len(t), np.int64), [], t, e)


def _aggregates(store: Store, extraction_id: str):
    from hefeat.store.features import slide_aggregates

    a = slide_aggregates(store, extraction_id)
    return a, {s: i for i, s in enumerate(a.slide_ids)}


def _tile_moments(agg, slides: list[list[str]], bags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every tile of the given bags, from the per-slide aggregates (no tile read)."""
    a, pos = agg
    k = [pos[s] for b in bags for s in slides[int(b)]]
    n = a.n[k].astype(float)[:, None]
    mean = (a.mean[k] * n).sum(0) / n.sum()
    var = ((a.std[k] ** 2 + a.mean[k] ** 2) * n).sum(0) / n.sum() - mean**2
    return mean, np.sqrt(np.maximum(var, 0))


def mean_pooled(store: Store, extraction_id: str, slides: list[list[str]]) -> np.ndarray:
    """Tile-weighted mean embedding per bag, from the aggregates written at extraction."""
    from hefeat.store.features import slide_aggregates

    a = slide_aggregates(store, extraction_id)
    pos = {s: i for i, s in enumerate(a.slide_ids)}
    out = np.empty((len(slides), a.mean.shape[1]))
    for b, ss in enumerate(slides):
        k = [pos[s] for s in ss]
        out[b] = (a.mean[k] * a.n[k, None]).sum(0) / max(a.n[k].sum(), 1)
    return out
