"""HE2RNA (Schmauch et al., Nature Communications 2020): super-tiles, a per-tile MLP, random top-k.

Each slide becomes up to `supertiles` super-tiles (k-means on tile coordinates, mean feature per
cluster). An MLP of 1x1 convolutions scores every (super-)tile per gene; a slide's value for a gene is
the mean of its k highest tile scores, k drawn at random from `ks` at each training step and averaged
over every k at inference. Padding never enters the top-k, and a slide with fewer than k real tiles
uses all of them. The output bias starts at the training mean expression.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.data import expression_table, train_gene_filter, transform_values
from hefeat.learn.models import (
    load_model,
    load_table,
    model_exists,
    model_id,
    model_summary,
    save_model,
)
from hefeat.learn.splits import assert_disjoint, group_holdout, group_kfold
from hefeat.learn.stats import columnwise_pearson, correct, empirical_p, r2_score_cols, r_pvalue
from hefeat.store.catalog import Store

SUPERTILE_KS = (1, 2, 5, 10, 20, 50, 100)
ALL_TILE_KS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class He2rnaParams:
    """Parameters of `hefeat fit he2rna` (recorded with the model)."""

    extraction_id: str
    dataset: str = "expression"
    genes: list[str] | None = None
    transform: str = "log10p"
    median_positive: bool = True
    min_variance: float = 0.0
    supertiles: int | None = 100
    ks: list[int] = field(default_factory=lambda: list(SUPERTILE_KS))
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.25
    epochs: int = 100
    patience: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 1e-4
    folds: int = 5
    n_untrained: int = 3
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Super-tiles
# ----------------------------------------------------------------------------------------------
def supertiles(features: np.ndarray, coords: np.ndarray, n_clusters: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means on tile coordinates; returns (mean feature per cluster (c, d), cluster of each tile (n,))."""
    from sklearn.cluster import KMeans

    n = len(features)
    c = min(n_clusters, n)
    if c == n:
        return features.astype(np.float32), np.arange(n)
    km = KMeans(n_clusters=c, n_init=1, random_state=seed).fit(coords.astype(np.float64))
    lab = km.labels_
    sums = np.zeros((c, features.shape[1]))
    np.add.at(sums, lab, features)
    counts = np.bincount(lab, minlength=c)
    keep = counts > 0
    return (sums[keep] / counts[keep, None]).astype(np.float32), lab


def pad_bags(bags: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length bags (t_i, d) into (b, T, d) with a boolean mask (b, T)."""
    T = max(len(b) for b in bags)
    d = bags[0].shape[1]
    X = np.zeros((len(bags), T, d), np.float32)
    M = np.zeros((len(bags), T), bool)
    for i, b in enumerate(bags):
        X[i, :len(b)] = b
        M[i, :len(b)] = True
    return X, M


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def topk_mean(scores, mask, k: int):
    """Mean of each slide's k highest tile scores per gene; scores (B, G, T), mask (B, T) -> (B, G).

    Padded tiles are -inf before the top-k so they never displace a real tile (even a negative one);
    a slide with fewer than k real tiles averages all of them.
    """
    import torch

    B, G, T = scores.shape
    kk = min(k, T)
    s = scores.masked_fill(~mask[:, None, :], float("-inf"))
    top = s.topk(kk, dim=2).values
    k_eff = mask.sum(1).clamp(max=kk).clamp(min=1)
    keep = torch.arange(kk, device=scores.device)[None, :] < k_eff[:, None]
    top = torch.where(keep[:, None, :], top, torch.zeros((), dtype=top.dtype, device=top.device))
    return top.sum(2) / k_eff[:, None].to(top.dtype)


def make_net(d_in: int, n_genes: int, hidden: list[int], dropout: float, bias_init: np.ndarray | None = None,
             feat_mean: np.ndarray | None = None, feat_std: np.ndarray | None = None):
    """The per-tile MLP as 1x1 convolutions: (B, d, T) -> (B, G, T); inputs standardised first."""
    import torch
    from torch import nn

    norm = nn.Conv1d(d_in, d_in, 1, groups=d_in)  # fixed per-feature (x - mean) / std, saved with the net
    with torch.no_grad():
        m = torch.zeros(d_in) if feat_mean is None else torch.as_tensor(feat_mean, dtype=torch.float32)
        sd = torch.ones(d_in) if feat_std is None else torch.as_tensor(feat_std, dtype=torch.float32)
        norm.weight.copy_((1 / sd).view(d_in, 1, 1))
        norm.bias.copy_(-m / sd)
    norm.requires_grad_(False)
    layers, d = [norm], d_in
    for h in hidden:
        layers += [nn.Conv1d(d, h, 1), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    last = nn.Conv1d(d, n_genes, 1)
    if bias_init is not None:
        with torch.no_grad():
            last.bias.copy_(torch.as_tensor(bias_init, dtype=torch.float32))
    layers.append(last)
    return nn.Sequential(*layers)


def predict_bags(net, X: np.ndarray, M: np.ndarray, ks: list[int], *, batch: int = 64) -> np.ndarray:
    """Inference: slide predictions averaged over every k in `ks`; (b, G)."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            x = torch.from_numpy(X[i:i + batch]).transpose(1, 2)
            m = torch.from_numpy(M[i:i + batch])
            s = net(x)
            out.append(torch.stack([topk_mean(s, m, k) for k in ks]).mean(0).numpy())
    return np.concatenate(out)


def train_net(X: np.ndarray, M: np.ndarray, Y: np.ndarray, Xv: np.ndarray, Mv: np.ndarray, Yv: np.ndarray,
              p: He2rnaParams, *, seed: int) -> tuple[object, dict]:
    """Train with random-k top-k and early stopping on the validation bags; returns the best net."""
    from hefeat.learn.torchutil import flush_denormals

    with flush_denormals():
        return _train_loop(X, M, Y, Xv, Mv, Yv, p, seed=seed)


def _train_loop(X, M, Y, Xv, Mv, Yv, p: He2rnaParams, *, seed: int):
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    real = X[M]
    net = make_net(X.shape[2], Y.shape[1], p.hidden, p.dropout, bias_init=Y.mean(0),
                   feat_mean=real.mean(0), feat_std=real.std(0) + 1e-6)
    opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=p.lr, weight_decay=p.weight_decay)
    Xt, Mt, Yt = torch.from_numpy(X).transpose(1, 2), torch.from_numpy(M), torch.from_numpy(Y.astype(np.float32))
    best, best_state, bad, epochs = np.inf, None, 0, 0
    for epoch in range(p.epochs):
        net.train()
        for idx in np.array_split(rng.permutation(len(X)), max(1, int(np.ceil(len(X) / p.batch_size)))):
            k = int(rng.choice(p.ks))
            pred = topk_mean(net(Xt[idx]), Mt[idx], k)
            loss = ((pred - Yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = float(((predict_bags(net, Xv, Mv, p.ks) - Yv) ** 2).mean())
        epochs = epoch + 1
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= p.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return net, {"epochs": epochs, "best_val_mse": best}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _bags(store: Store, eid: str, slides_per_sample: list[list[str]], p: He2rnaParams) -> list[np.ndarray]:
    from hefeat.store.features import read_features

    tid = store.extraction(eid)["tiling_id"]
    bags = []
    for slides in slides_per_sample:
        parts = []
        for sid in slides:
            F = read_features(store.features_path(eid, sid))
            if p.supertiles:
                C = store.tiles(tid, sid)[["x", "y"]].to_numpy()
                F, _ = supertiles(F, C, p.supertiles, seed=p.seed)
            parts.append(F)
        bags.append(np.concatenate(parts))
    return bags


def _samples(store: Store, p: He2rnaParams):
    wide = expression_table(store, p.dataset, p.genes)
    smap = store.sql("SELECT sample_id, slide_id, patient_id FROM samples WHERE dataset = ?", [p.dataset])
    done = set(store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ?", [p.extraction_id])["slide_id"])
    smap = smap[smap["slide_id"].isin(done) & smap["sample_id"].isin(wide.index)]
    if smap.empty:
        raise HefeatError(f"No sample of {p.dataset!r} has features in extraction {p.extraction_id}")
    g = smap.groupby("sample_id", sort=True)
    ids = np.array(list(g.groups))
    slides = [sorted(g.get_group(s)["slide_id"]) for s in ids]
    groups = np.array([g.get_group(s)["patient_id"].iloc[0] for s in ids])
    Y = transform_values(wide.loc[ids].to_numpy(float), p.transform)
    if np.isnan(Y).any():
        raise HefeatError("Targets contain NaN; impute or drop those genes/samples")
    return ids, slides, groups, Y, list(wide.columns)


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------
def fit_he2rna(store: Store, p: He2rnaParams, *, truth: str | Path | None = None, force: bool = False) -> dict:
    """5-fold patient-grouped CV of HE2RNA; per-gene Pearson R vs an untrained-model null; final refit."""
    import torch

    t0 = time.perf_counter()
    pdict = asdict(p)
    mid = model_id("he2rna", pdict)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True, truth=truth)
    store.extraction(p.extraction_id)
    ids, slides, groups, Y, genes = _samples(store, p)
    keep = train_gene_filter(Y, min_variance=p.min_variance, median_positive=p.median_positive) & (Y.std(0) > 0)
    if not keep.any():
        raise HefeatError("No gene passes the filters (median > 0, variance)")
    bags = _bags(store, p.extraction_id, slides, p)
    X, M = pad_bags(bags)
    n, G = len(ids), len(genes)
    folds = group_kfold(groups, min(p.folds, len(np.unique(groups))), seed=p.seed)
    oof = np.full((n, G), np.nan)
    null_oof = [np.full((n, G), np.nan) for _ in range(p.n_untrained)]
    info = []
    for i, f in enumerate(folds):
        assert_disjoint(groups, f.train, f.test)
        fk = train_gene_filter(Y[f.train], min_variance=p.min_variance, median_positive=p.median_positive) & keep
        inner = group_holdout(groups[f.train], 0.2, seed=p.seed + i)
        tr, va = f.train[inner.train], f.train[inner.test]
        net, h = train_net(X[tr], M[tr], Y[tr][:, fk], X[va], M[va], Y[va][:, fk], p, seed=p.seed + i)
        oof[np.ix_(f.test, np.flatnonzero(fk))] = predict_bags(net, X[f.test], M[f.test], p.ks)
        for u in range(p.n_untrained):  # the untrained model of the same architecture: HE2RNA's null
            torch.manual_seed(10_000 + 97 * i + u)
            real = X[tr][M[tr]]
            un = make_net(X.shape[2], int(fk.sum()), p.hidden, p.dropout, bias_init=Y[tr][:, fk].mean(0),
                          feat_mean=real.mean(0), feat_std=real.std(0) + 1e-6)
            null_oof[u][np.ix_(f.test, np.flatnonzero(fk))] = predict_bags(un, X[f.test], M[f.test], p.ks)
        info.append({"fold": f.name, **h})
    ev = np.flatnonzero(~np.isnan(oof).any(0))
    gsel = [genes[j] for j in ev]
    r = columnwise_pearson(oof[:, ev], Y[:, ev])
    null = np.concatenate([columnwise_pearson(nr[:, ev], Y[:, ev]) for nr in null_oof]) if null_oof else np.array([0.0])
    p_null = empirical_p(r, null)
    metrics = pd.DataFrame({"gene": gsel, "n": n, "pearson_r": r, "pearson_p": r_pvalue(r, n),
                            "p_vs_untrained": p_null, "r2": r2_score_cols(oof[:, ev], Y[:, ev])})
    metrics["p_bh"] = correct(p_null, "bh")
    metrics["p_holm_sidak"] = correct(p_null, "holm-sidak")
    metrics["significant"] = metrics["p_bh"] < 0.05
    split = f"patient-kfold:{len(folds)} seed={p.seed}"
    metrics["split"] = split
    # Final model on all samples (20 % of patients for early stopping).
    final_split = group_holdout(groups, 0.2, seed=p.seed)
    net, h = train_net(X[final_split.train], M[final_split.train], Y[final_split.train][:, ev],
                       X[final_split.test], M[final_split.test], Y[final_split.test][:, ev], p, seed=p.seed)
    store.model_dir(mid).mkdir(parents=True, exist_ok=True)
    from hefeat.store.atomic import atomic_path

    with atomic_path(store.model_dir(mid) / "net.pt") as tmp:
        torch.save(net.state_dict(), tmp)
    summary = {"model_id": mid, "kind": "he2rna", "extraction_id": p.extraction_id, "n_samples": int(n),
               "n_genes": len(gsel), "n_significant": int(metrics["significant"].sum()),
               "n_r2_above_0.2": int((metrics["r2"] > 0.2).sum()), "median_pearson_r": float(np.nanmedian(r)),
               "median_untrained_r": float(np.nanmedian(null)), "split": split,
               "d_in": int(X.shape[2]), "epochs_final": h["epochs"]}
    oof_df = pd.DataFrame(oof[:, ev], columns=gsel)
    oof_df.insert(0, "patient_id", groups)
    oof_df.insert(0, "sample_id", ids)
    save_model(store, mid, kind="he2rna", params=pdict, summary=summary, arrays={"genes": np.array(gsel)},
               tables={"metrics": metrics, "oof_predictions": oof_df, "training": pd.DataFrame(info)},
               extraction_id=p.extraction_id, seconds=round(time.perf_counter() - t0, 3))
    return model_summary(store, mid, cached=False, truth=truth)


def load_net(store: Store, mid: str):
    """The final HE2RNA network of a stored model, and its model.json."""
    import torch

    meta = load_model(store, mid)
    p = meta["params"]
    genes = [str(g) for g in meta["arrays"]["genes"]]
    net = make_net(int(meta["summary"]["d_in"]), len(genes), p["hidden"], p["dropout"])
    net.load_state_dict(torch.load(store.model_dir(mid) / "net.pt", weights_only=True))
    net.eval()
    return net, meta, genes


def predict_he2rna(store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Tile scores of every tile (virtual spatialisation) for the best genes, and slide predictions."""
    import torch

    from hefeat.store.features import iter_slide_features
    from hefeat.store.tables import write_parquet

    net, meta, genes = load_net(store, mid)
    eid = meta["extraction_id"]
    tid = store.extraction(eid)["tiling_id"]
    m = load_table(store, mid, "metrics")
    chosen = m.sort_values("pearson_r", ascending=False)["gene"].head(top).tolist()
    cols = [genes.index(g) for g in chosen]
    ks = meta["params"]["ks"]
    rows, n = [], 0
    for sid, F in iter_slide_features(store, eid, slides):
        with torch.no_grad():
            s = net(torch.from_numpy(F[None]).transpose(1, 2))[0].numpy().T  # (tiles, G)
        tiles = store.tiles(tid, sid)[["tile_id", "x", "y"]].reset_index(drop=True)
        df = pd.concat([tiles, pd.DataFrame(s[:, cols], columns=chosen)], axis=1)
        df.insert(0, "slide_id", sid)
        df.insert(0, "model_id", mid)
        write_parquet(df, store.predictions_path(mid, sid))
        mask = np.ones((1, len(F)), bool)
        rows.append(pd.Series(predict_bags(net, F[None], mask, ks)[0], index=genes, name=sid))
        n += len(df)
    sp = pd.DataFrame(rows)
    sp.index.name = "slide_id"
    write_parquet(sp.reset_index(), store.model_dir(mid) / "slide_predictions.parquet")
    return {"model_id": mid, "slides": len(rows), "tiles": n, "tile_genes": chosen}
