"""Held-out metrics of MIL scores with patient bootstrap CIs (AUC and accuracy; Pearson r and R²; C-index and
time-dependent AUC), and the mean-pooled baseline (logistic / ridge / linear Cox) on the same folds."""

from __future__ import annotations

import numpy as np

from hefeat.learn.mil.data import Targets
from hefeat.learn.mil.params import MilParams
from hefeat.learn.mil.survival import _c_index, _linear_cox, time_dependent_auc


def binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of 0/1 labels by the rank-sum (Mann-Whitney) formula, ties counted half; NaN for one class."""
    from scipy.stats import rankdata

    y = np.asarray(y)
    n1 = int((y == 1).sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _metric_rows(tg: Targets, idx: np.ndarray, score: np.ndarray, groups: np.ndarray, p: MilParams,
                 model: str) -> list[dict]:
    """Metric rows (metric, value, ci_low, ci_high, n) of out-of-fold scores, patient bootstrap CIs."""
    from hefeat.learn.stats import bootstrap_ci

    g = groups[idx]
    rows = []

    def add(name, fn):
        v = fn(np.arange(len(idx)))
        lo, hi = bootstrap_ci(fn, len(idx), n_boot=p.n_boot, seed=p.seed, groups=g, level=p.ci_level)
        rows.append({"model": model, "metric": name, "value": v, "ci_low": lo, "ci_high": hi, "n": int(len(idx)),
                     "n_patients": int(len(np.unique(g)))})

    if tg.task == "classification":
        y = tg.y[idx]
        K = len(tg.classes)
        if K == 2:
            add("auc", lambda j: binary_auc(y[j], score[j, 1]))
        else:
            def mauc(j):  # macro one-vs-rest AUC (roc_auc_score's multi_class="ovr"), by ranks
                if len(np.unique(y[j])) < K:
                    return np.nan
                return float(np.mean([binary_auc((y[j] == c).astype(int), score[j, c]) for c in range(K)]))
            add("auc", mauc)
        add("accuracy", lambda j: float((score[j].argmax(1) == y[j]).mean()))
    elif tg.task == "regression":
        y = tg.y[idx]
        s = score.reshape(-1)

        def r(j):
            return float(np.corrcoef(s[j], y[j])[0, 1]) if np.std(s[j]) > 0 and np.std(y[j]) > 0 else np.nan
        add("pearson_r", r)
        add("r2", lambda j: float(1 - ((y[j] - s[j]) ** 2).sum() / max(((y[j] - y[j].mean()) ** 2).sum(), 1e-12)))
    else:
        t, e, s = tg.time[idx], tg.event[idx], score.reshape(-1)
        add("c_index", lambda j: _c_index(t[j], e[j], s[j]))
        ev = t[e > 0]
        taus = np.quantile(ev, [0.25, 0.5, 0.75]) if len(ev) else []
        for q, tau in zip((25, 50, 75), taus, strict=False):
            add(f"td_auc_q{q}", lambda j, tau=tau: time_dependent_auc(t[j], e[j], s[j], tau))
    return rows


def _baseline_scores(Xm: np.ndarray, tg: Targets, folds, p: MilParams) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(Xm)
    K = len(tg.classes)
    score = np.full((n, K) if tg.task == "classification" else (n,), np.nan)
    for f in folds:
        sc = StandardScaler().fit(Xm[f.train])
        A, B = sc.transform(Xm[f.train]), sc.transform(Xm[f.test])
        if tg.task == "classification":
            clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced" if p.class_weights else None)
            clf.fit(A, tg.y[f.train])
            P = np.zeros((len(f.test), K))
            P[:, clf.classes_] = clf.predict_proba(B)
            score[f.test] = P
        elif tg.task == "regression":
            score[f.test] = make_pipeline(RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(A, tg.y[f.train]).predict(B)
        else:
            score[f.test] = _linear_cox(A, tg.time[f.train], tg.event[f.train], B)
    return score
