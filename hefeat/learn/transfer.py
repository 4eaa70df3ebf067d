"""Transcriptomic representation transfer (Schmauch et al. 2020, the MSI experiment).

On "hospital A", an MLP mean-features -> 1024 -> 256 (sigmoid) -> genes learns expression; its 256-d
hidden layer becomes a slide representation. On "hospital B", the same classifier predicts a label
from (1) raw mean features, (2) that representation, (3) the 256-d code of an autoencoder
features -> 1024 -> 256 -> 1024 -> features trained on A. Repeated random A/B patient splits at
several sizes of B; AUC per arm (3-fold CV on B) and a two-sided Wilcoxon test between arms.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.data import clinical_by_slide, slide_level_data
from hefeat.learn.models import load_model, model_exists, model_id, model_summary, save_model
from hefeat.store.catalog import Store

ARMS = ("raw", "representation", "autoencoder")


@dataclass
class TransferParams:
    """Parameters of `hefeat fit transfer` (recorded with the model)."""

    from_model: str
    label: str
    b_shares: list[float] = field(default_factory=lambda: [0.3, 0.5])
    n_splits: int = 10
    hidden: int = 1024
    code: int = 256
    epochs: int = 300
    lr: float = 1e-3
    folds: int = 3
    seed: int = 0


def _mlp(sizes: list[int], code_at: int | None = None):
    from torch import nn

    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Sigmoid() if i + 1 == code_at else nn.ReLU())
    return nn.Sequential(*layers)


def _train(net, X: np.ndarray, T: np.ndarray, *, epochs: int, lr: float, seed: int):

    from hefeat.learn.torchutil import flush_denormals

    with flush_denormals():
        return _train_loop(net, X, T, epochs=epochs, lr=lr, seed=seed)


def _train_loop(net, X: np.ndarray, T: np.ndarray, *, epochs: int, lr: float, seed: int):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    x, t = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(T, dtype=torch.float32)
    net.train()
    for _ in range(epochs):
        loss = ((net(x) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


def _code(net, X: np.ndarray, upto: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net[:upto](torch.as_tensor(X, dtype=torch.float32)).numpy()


def representations(XA: np.ndarray, YA: np.ndarray, XB: np.ndarray, p: TransferParams, seed: int) -> dict[str, np.ndarray]:
    """The three slide representations of hospital B, each learned on hospital A only."""
    import torch

    mu, sd = XA.mean(0), XA.std(0) + 1e-6
    za, zb = (XA - mu) / sd, (XB - mu) / sd
    ym, ys = YA.mean(0), YA.std(0) + 1e-6
    torch.manual_seed(seed)
    rep = _train(_mlp([XA.shape[1], p.hidden, p.code, YA.shape[1]], code_at=2), za, (YA - ym) / ys,
                 epochs=p.epochs, lr=p.lr, seed=seed)
    torch.manual_seed(seed + 1)
    ae = _train(_mlp([XA.shape[1], p.hidden, p.code, p.hidden, XA.shape[1]], code_at=2), za, za,
                epochs=p.epochs, lr=p.lr, seed=seed + 1)
    return {"raw": zb, "representation": _code(rep, zb, 4), "autoencoder": _code(ae, zb, 4)}


def cv_auc(Z: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int, seed: int) -> float:
    """AUC of pooled out-of-fold probabilities of an MLP (128 hidden) classifier, folds grouped by patient."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.neural_network import MLPClassifier

    k = min(folds, int(np.bincount(y).min()))
    if k < 2:
        return float("nan")
    prob = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(Z, y, groups):
        if len(np.unique(y[tr])) < 2:
            prob[te] = y[tr].mean()
            continue
        clf = MLPClassifier(hidden_layer_sizes=(128,), solver="lbfgs", alpha=1e-2, max_iter=500,
                            random_state=seed).fit(Z[tr], y[tr])
        prob[te] = clf.predict_proba(Z[te])[:, 1]
    return float(roc_auc_score(y, prob))


def fit_transfer(store: Store, p: TransferParams, *, force: bool = False) -> dict:
    """Run the A/B transfer experiment; stores the AUC table and the Wilcoxon tests."""
    from scipy.stats import wilcoxon

    t0 = time.perf_counter()
    src = load_model(store, p.from_model)
    if src["kind"] not in ("he2rna", "genes"):
        raise HefeatError(f"--from must be an expression model (genes or he2rna), got {src['kind']}")
    pdict = asdict(p)
    mid = model_id("transfer", pdict)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True)
    sp = src["params"]
    genes = [str(g) for g in src["arrays"]["genes"]]
    data = slide_level_data(store, sp["extraction_id"], dataset=sp.get("dataset", "expression"), genes=genes,
                            transform=sp.get("transform", "log1p"))
    y = _labels(store, data, p.label)
    ok = ~np.isnan(y)
    X, Y, groups, y = data.X[ok], data.Y[ok], data.groups[ok], y[ok].astype(int)
    if len(np.unique(y)) != 2:
        raise HefeatError(f"Label {p.label!r} must be binary with both classes present (found {np.unique(y)})")
    rng = np.random.default_rng(p.seed)
    ug = np.unique(groups)
    rows = []
    for share in p.b_shares:
        for s in range(p.n_splits):
            for _ in range(100):  # draw until hospital B has both classes twice
                b_groups = set(rng.choice(ug, max(2, int(round(share * len(ug)))), replace=False))
                inB = np.array([g in b_groups for g in groups])
                if np.bincount(y[inB], minlength=2).min() >= 2 and (~inB).sum() >= 4:
                    break
            else:
                raise HefeatError(f"Cannot draw a hospital B with both classes at share {share}; too few slides")
            reps = representations(X[~inB], Y[~inB], X[inB], p, seed=p.seed + s)
            for arm, Z in reps.items():
                rows.append({"b_share": share, "split": s, "arm": arm, "n_a": int((~inB).sum()), "n_b": int(inB.sum()),
                             "auc": cv_auc(Z, y[inB], groups[inB], folds=p.folds, seed=p.seed + s)})
    table = pd.DataFrame(rows)
    tests = []
    for share, g in table.groupby("b_share"):
        piv = g.pivot(index="split", columns="arm", values="auc").dropna()
        for other in ("raw", "autoencoder"):
            d = piv["representation"] - piv[other]
            pval = float(wilcoxon(piv["representation"], piv[other]).pvalue) if (d != 0).sum() >= 1 and len(d) >= 2 else 1.0
            tests.append({"b_share": share, "comparison": f"representation vs {other}", "median_diff": float(d.median()),
                          "wilcoxon_p": pval, "n_splits": int(len(d))})
    tests = pd.DataFrame(tests)
    med = table.groupby(["b_share", "arm"])["auc"].median()
    summary = {"model_id": mid, "kind": "transfer", "label": p.label, "from_model": p.from_model,
               "extraction_id": sp["extraction_id"], "n_samples": int(len(y)),
               **{f"auc_{arm}_b{share:g}": float(med[(share, arm)]) for share in p.b_shares for arm in ARMS},
               "min_wilcoxon_p": float(tests["wilcoxon_p"].min())}
    save_model(store, mid, kind="transfer", params=pdict, summary=summary, tables={"aucs": table, "tests": tests},
               extraction_id=sp["extraction_id"], seconds=round(time.perf_counter() - t0, 3))
    return {**summary, "cached": False, "tests": tests.to_dict("records")}


def _labels(store: Store, data, label: str) -> np.ndarray:
    clin = clinical_by_slide(store)
    if label not in clin.columns:
        raise HefeatError(f"Label {label!r} is not a clinical column; ingest a clinical table that has it")
    m = clin.set_index("slide_id")[label]
    vals = [m.get(s[0], np.nan) for s in data.slides]
    return pd.to_numeric(pd.Series(vals), errors="coerce").to_numpy(float)
