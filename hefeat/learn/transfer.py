"""Transcriptomic representation transfer (Schmauch et al. 2020, the MSI experiment).

On "hospital A", an MLP mean-features -> 1024 -> 256 (sigmoid) -> genes learns expression; its 256-d
hidden layer becomes a slide representation. On "hospital B", the same classifier predicts a label
from (1) raw mean features, (2) that representation, (3) the 256-d code of an autoencoder
features -> 1024 -> 256 -> 1024 -> features trained on A. Repeated random A/B patient splits at
several sizes of B; AUC per arm (3-fold CV on B) and a two-sided Wilcoxon test between arms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    param,
    register,
)
from hefeat.store.catalog import Store

ARMS = ("raw", "representation", "autoencoder")
# Below these, hospital B's cross-validated AUC says little: the fit says so in a note.
SMALL_B_SLIDES, SMALL_B_CLASS = 12, 4


@dataclass(frozen=True, kw_only=True)
class TransferParams(Params):
    """Parameters of `hefeat fit transfer` (recorded with the model)."""

    from_model: str = param(help="An expression model (genes or he2rna) whose extraction, targets and genes are used.",
                            flag="--from")
    label: str = param(help="Binary clinical column predicted at hospital B, e.g. msi_status.")
    b_shares: tuple[float, ...] = param((0.3, 0.5), "Sizes of hospital B (share of patients).")
    n_splits: int = param(10, "Random A/B splits per size (paper: 50).", flag="--splits")
    hidden: int = param(1024, "Hidden layer of the expression MLP and the autoencoder.")
    code: int = param(256, "Size of the representation (sigmoid bottleneck).")
    epochs: int = param(300, "Full-batch Adam epochs of the representation and the autoencoder.")
    lr: float = param(1e-3, "Adam learning rate.")
    weight_decay: float = param(1e-4, "Adam weight decay.")
    folds: int = param(3, "Cross-validation folds at hospital B (patient-grouped, stratified).")
    clf_hidden: int = param(128, "Hidden units of hospital B's MLP classifier.")
    clf_alpha: float = param(1e-2, "L2 penalty of hospital B's classifier.")
    clf_max_iter: int = param(500, "lbfgs iterations of hospital B's classifier.")
    alpha: float = param(0.05, "Significance level of the Wilcoxon comparison in the headline.")
    seed: int = param(0, "Seed of the A/B draws, folds and network initialisations.")

    def validate(self) -> None:
        if not self.b_shares or not all(0 < s < 1 for s in self.b_shares):
            raise HefeatError("--b-shares must be shares strictly between 0 and 1, e.g. 0.3,0.5")
        for name in ("n_splits", "hidden", "code", "epochs", "clf_hidden", "clf_max_iter"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_range("--folds", self.folds, 2)
        check_range("--lr", self.lr, 0, lo_open=True)
        check_range("--alpha", self.alpha, 0, 1, lo_open=True, hi_open=True)


def _source(store: Store, p: TransferParams) -> dict:
    from hefeat.learn.registry import get_method, method_of

    m, src = method_of(store, p.from_model)
    if m.name not in ("he2rna", "genes"):
        raise HefeatError(f"--from must be an expression model (genes or he2rna), got a {m.name} model "
                          f"({get_method(m.name).prefix}...)")
    return src


def _inputs(store: Store, p: TransferParams) -> dict:
    """The data the source model's parameters point at, read again here: their fingerprints."""
    from types import SimpleNamespace

    from hefeat.learn.data import input_fingerprints

    sp = _source(store, p)["params"]
    fp = input_fingerprints(store, SimpleNamespace(extraction_id=sp["extraction_id"],
                                                   dataset=sp.get("dataset", "expression")))
    return {f"source {k}": v for k, v in fp.items()}


def representations(XA: np.ndarray, YA: np.ndarray, XB: np.ndarray, p: TransferParams, seed: int) -> dict[str, np.ndarray]:
    """The three slide representations of hospital B, each learned on hospital A only."""
    from hefeat.learn.nets import AutoencoderCode, ExpressionRepresentation, derive_seed

    kw = dict(code=p.code, epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay)
    rep = ExpressionRepresentation(p.hidden, random_state=derive_seed(seed, 1), **kw).fit(XA, YA)
    ae = AutoencoderCode(p.hidden, random_state=derive_seed(seed, 2), **kw).fit(XA)
    mu, sd = XA.mean(0), XA.std(0) + 1e-6
    return {"raw": (XB - mu) / sd, "representation": rep.transform(XB), "autoencoder": ae.transform(XB)}


def classifier(p: TransferParams, seed: int):
    """Hospital B's classifier: an MLP with one hidden layer (lbfgs)."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(p.clf_hidden,), solver="lbfgs", alpha=p.clf_alpha,
                         max_iter=p.clf_max_iter, random_state=seed)


def cv_auc(Z: np.ndarray, y: np.ndarray, groups: np.ndarray, p: TransferParams, *, seed: int) -> float:
    """AUC of pooled out-of-fold probabilities, folds grouped by patient and stratified; NaN if not estimable."""
    import warnings

    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    k = min(p.folds, int(np.bincount(y).min()), len(np.unique(groups)))
    if k < 2:
        return float("nan")
    prob = np.zeros(len(y))
    base = classifier(p, seed)
    for tr, te in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(Z, y, groups):
        if len(np.unique(y[tr])) < 2:
            prob[te] = y[tr].mean()
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            prob[te] = clone(base).fit(Z[tr], y[tr]).predict_proba(Z[te])[:, 1]
    return float(roc_auc_score(y, prob))


def fit_transfer(store: Store, p: TransferParams, model_id: str) -> FitResult:
    """Run the A/B transfer experiment; stores the AUC table and the Wilcoxon tests."""
    from scipy.stats import wilcoxon

    from hefeat.learn.data import slide_level_data
    from hefeat.learn.nets import derive_seed
    from hefeat.learn.threads import parallel_map

    src = _source(store, p)
    sp = src["params"]
    genes = [str(g) for g in src["arrays"]["genes"]]
    data = slide_level_data(store, sp["extraction_id"], dataset=sp.get("dataset", "expression"), genes=genes,
                            transform=sp.get("transform", "log1p"))
    y, classes = _labels(store, data, p.label)
    ok = y >= 0
    X, Y, groups, y = data.X[ok], data.Y[ok], data.groups[ok], y[ok]
    if len(classes) != 2:
        raise NotEstimable(f"Label {p.label!r} must be binary with both classes present among slides with features "
                           f"(found {classes})")
    rng = np.random.default_rng(p.seed)
    ug = np.unique(groups)
    jobs, notes = [], []
    for share in p.b_shares:  # every A/B draw first (sequential, seeded), then the splits in parallel
        for s in range(p.n_splits):
            for _ in range(100):  # draw until hospital B has both classes twice and A can train
                b_groups = set(rng.choice(ug, max(2, int(round(share * len(ug)))), replace=False))
                inB = np.array([g in b_groups for g in groups])
                if np.bincount(y[inB], minlength=2).min() >= 2 and (~inB).sum() >= 4:
                    break
            else:
                raise NotEstimable(f"Cannot draw a hospital B with both classes twice at share {share} "
                                   f"({len(ug)} patients); use a larger --b-shares or more slides")
            jobs.append((p, share, s, X, Y, y, groups, inB, derive_seed(p.seed, int(round(share * 1000)), s)))
    rows = [r for rs in parallel_map(_one_split, jobs) for r in rs]
    table = pd.DataFrame(rows)
    if table["auc"].isna().all():
        raise NotEstimable("No hospital B split gave an AUC (too few slides per class for cross-validation); "
                           "use a larger --b-shares or more slides")
    tests = []
    for share, g in table.groupby("b_share"):
        piv = g.pivot(index="split", columns="arm", values="auc").dropna()
        for other in ("raw", "autoencoder"):
            d = piv["representation"] - piv[other]
            pval = float(wilcoxon(piv["representation"], piv[other]).pvalue) if (d != 0).any() and len(d) >= 2 else 1.0
            tests.append({"b_share": share, "comparison": f"representation vs {other}", "median_diff": float(d.median()),
                          "wilcoxon_p": pval, "n_splits": int(len(d))})
        nb, c_min = int(g["n_b"].median()), int(g[["n_b_class0", "n_b_class1"]].min(axis=1).min())
        if nb < SMALL_B_SLIDES or c_min < SMALL_B_CLASS:
            notes.append(f"hospital B at share {share:g} has {nb} slides (smallest class {c_min} in some split): "
                         f"{min(p.folds, c_min)}-fold AUCs on so few slides are not informative; use a larger "
                         "--b-shares or more slides")
        if len(piv) < 6:
            notes.append(f"share {share:g}: {len(piv)} splits cannot give a Wilcoxon p below 0.05 "
                         f"(two-sided needs >= 6); use --splits 20 or more (paper: 50)")
    tests = pd.DataFrame(tests)
    med = table.groupby(["b_share", "arm"])["auc"].median()
    summary = {"label": p.label, "classes": ",".join(classes), "positive_class": classes[-1],
               "from_model": p.from_model, "extraction_id": sp["extraction_id"],
               "n_samples": int(len(y)), "alpha": p.alpha,
               **{f"auc_{arm}_b{share:g}": float(med[(share, arm)]) for share in p.b_shares for arm in ARMS},
               **{f"n_b_b{share:g}": int(table.loc[table["b_share"] == share, "n_b"].median()) for share in p.b_shares},
               **{f"wilcoxon_p_vs_raw_b{t['b_share']:g}": t["wilcoxon_p"] for t in tests.to_dict("records")
                  if t["comparison"] == "representation vs raw"},
               "min_wilcoxon_p": float(tests["wilcoxon_p"].min())}
    return FitResult(summary=summary, tables={"aucs": table, "tests": tests}, extraction_id=sp["extraction_id"],
                     notes=notes)


def _one_split(job) -> list[dict]:
    """One A/B split: the three representations learned on A, each arm's cross-validated AUC on B."""
    p, share, s, X, Y, y, groups, inB, seed = job
    reps = representations(X[~inB], Y[~inB], X[inB], p, seed=seed)
    counts = np.bincount(y[inB], minlength=2)
    return [{"b_share": share, "split": s, "arm": arm, "n_a": int((~inB).sum()), "n_b": int(inB.sum()),
             "n_b_class0": int(counts[0]), "n_b_class1": int(counts[1]),
             "auc": cv_auc(Z, y[inB], groups[inB], p, seed=seed)} for arm, Z in reps.items()]


def _labels(store: Store, data, label: str) -> tuple[np.ndarray, list[str]]:
    """Class index per row (-1 where missing) and the classes (numbers in numeric order, else sorted text;
    the last class is the positive one): string labels (MSI-H / MSS) are classes, not NaN."""
    from hefeat.learn.data import clinical_by_slide

    clin = clinical_by_slide(store)
    if label not in clin.columns:
        raise HefeatError(f"Label {label!r} is not a clinical column; ingest a clinical table that has it")
    m = clin.set_index("slide_id")[label]
    vals = pd.Series([m.get(s[0], np.nan) for s in data.slides], dtype=object)
    present = vals.notna()
    num = pd.to_numeric(vals[present], errors="coerce")
    keys = num if len(num) and num.notna().all() else vals[present].astype(str)
    classes = sorted(keys.unique().tolist())
    y = np.full(len(vals), -1)
    y[present.to_numpy()] = keys.map({c: i for i, c in enumerate(classes)}).to_numpy()
    return y, [f"{c:g}" if isinstance(c, float) else str(c) for c in classes]


def headline(s: dict) -> str:
    """Median AUC per arm and B size, with the representation-vs-raw Wilcoxon p."""
    shares = sorted({k.rsplit("_b", 1)[1] for k in s if k.startswith("auc_raw_b")}, key=float)
    parts = []
    for sh in shares:
        aucs = ", ".join(f"{arm} {s[f'auc_{arm}_b{sh}']:.3f}" for arm in ARMS)
        pv = s.get(f"wilcoxon_p_vs_raw_b{sh}")
        nb = s.get(f"n_b_b{sh}")
        verdict = ""
        if pv is not None:
            verdict = f"; representation vs raw Wilcoxon p = {pv:.3g}" + (
                f" (< {s.get('alpha', 0.05):g})" if pv < s.get("alpha", 0.05) else f" (not < {s.get('alpha', 0.05):g})")
        parts.append(f"B share {sh} ({nb} slides): median AUC {aucs}{verdict}")
    return f"{s['label']}: " + " | ".join(parts)


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    from hefeat.learn.report import transfer_plot

    return transfer_plot(store, mid, out)


register(Method(
    name="transfer", prefix="xfr-", params=TransferParams, fit=fit_transfer, headline=headline, plots=_plots,
    inputs=_inputs,
    summary="Transcriptomic representation (hospital A) vs raw features vs autoencoder for a label at hospital B.",
    example="hefeat fit transfer --from gen-0123abcd --label msi_status --splits 50",
))
