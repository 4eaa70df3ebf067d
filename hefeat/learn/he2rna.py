"""HE2RNA (Schmauch et al., Nature Communications 2020): super-tiles, a per-tile MLP, random top-k.

Each slide becomes up to `supertiles` super-tiles (k-means on tile coordinates, mean feature per
cluster). An MLP of 1x1 convolutions scores every (super-)tile per gene; a slide's value for a gene is
the mean of its k highest tile scores, k drawn at random from `ks` at each training step and averaged
over every k at inference. Padding never enters the top-k, and a slide with fewer than k real tiles
uses all of them. The output bias starts at the training mean expression.

`predict` scores a slide exactly as cross-validation did: the same super-tiles (same seed), the same
k-averaged top-k. Per-tile scores of every raw tile are written too (virtual spatialisation), but the
slide value is never a top-k over raw tiles when the model was trained on super-tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.emo import expression_units, gene_headline, gene_list
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    param,
    register,
)
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.predictions import write_predictions

SUPERTILE_KS = (1, 2, 5, 10, 20, 50, 100)
ALL_TILE_KS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _supertile_count(v: str) -> int | None:
    return None if v.strip() in ("0", "none", "None") else int(v)


@dataclass(frozen=True, kw_only=True)
class He2rnaParams(Params):
    """Parameters of `hefeat fit he2rna` (recorded with the model)."""

    extraction_id: str = param(help="Extraction whose tile embeddings make the bags.", flag="--extraction")
    dataset: str = param("expression", "Expression dataset (target table).", flag="--target")
    genes: tuple[str, ...] | None = param(None, "all, a file with one gene per line, or A,B,C.", parse=gene_list)
    transform: str = param("log10p", "Target transform (HE2RNA: log10(1 + x)).",
                           choices=("log10p", "log1p", "log2p", "none"))
    median_positive: bool = param(True, "Keep genes with training-fold median > 0 (the paper's filter).")
    min_variance: float = param(0.0, "Keep genes with training-fold variance above this.")
    supertiles: int | None = param(100, "Super-tiles per slide (k-means on coordinates); 0 = all tiles.",
                                   parse=_supertile_count)
    ks: tuple[int, ...] | None = param(None, "k list of the top-k (default: the paper's list for super-tiles or tiles).")
    hidden: tuple[int, ...] = param((256,), "Hidden layer sizes.")
    dropout: float = param(0.25, "Dropout between layers.")
    epochs: int = param(100, "Maximum epochs.")
    patience: int = param(10, "Early stopping: epochs without validation improvement.")
    lr: float = param(1e-3, "Adam learning rate.")
    batch_size: int = param(16, "Slides per step.")
    weight_decay: float = param(1e-4, "Adam weight decay.")
    folds: int = param(5, "Patient-grouped cross-validation folds.")
    val_share: float = param(0.2, "Share of each training fold's patients held out for early stopping.")
    n_untrained: int = param(3, "Untrained networks per fold (the null of the per-gene test).")
    fdr: float = param(0.05, "FDR at which a gene is called significant (BH on p vs the untrained null).")
    r2_threshold: float = param(0.2, "R² reported as 'genes with R² above'.")
    seed: int = param(0, "Seed of folds, inner splits, k-means, initialisations and null networks.")

    def validate(self) -> None:
        if self.supertiles == 0:  # 0 = train on all tiles
            object.__setattr__(self, "supertiles", None)
        if self.ks is None:
            object.__setattr__(self, "ks", SUPERTILE_KS if self.supertiles else ALL_TILE_KS)
        if not self.ks or min(self.ks) < 1:
            raise HefeatError("--ks must be positive integers")
        if self.supertiles is not None:
            check_range("--supertiles", self.supertiles, 1)
        if not self.hidden or min(self.hidden) < 1:
            raise HefeatError("--hidden must be positive layer sizes")
        check_range("--dropout", self.dropout, 0, 1, hi_open=True)
        check_range("--epochs", self.epochs, 1)
        check_range("--patience", self.patience, 1)
        check_range("--lr", self.lr, 0, lo_open=True)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--weight-decay", self.weight_decay, 0)
        check_range("--folds", self.folds, 2)
        check_range("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--n-untrained", self.n_untrained, 1)
        check_range("--fdr", self.fdr, 0, 1, lo_open=True, hi_open=True)

    def estimator(self, seed: int):
        """The network estimator with these hyperparameters."""
        from hefeat.learn.nets import He2rnaRegressor

        return He2rnaRegressor(self.hidden, dropout=self.dropout, ks=self.ks, epochs=self.epochs,
                               patience=self.patience, lr=self.lr, batch_size=self.batch_size,
                               weight_decay=self.weight_decay, val_share=self.val_share, random_state=seed)


# ----------------------------------------------------------------------------------------------
# Data: one bag of (super-)tiles per sample
# ----------------------------------------------------------------------------------------------
def supertiles(features: np.ndarray, coords: np.ndarray, n_clusters: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means on tile coordinates; returns (mean feature per cluster (c, d), cluster of each tile (n,))."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n = len(features)
    c = min(n_clusters, n)
    if c == n:
        return features.astype(np.float32), np.arange(n)
    with threadpool_limits(limits=1):  # a few hundred 2-d points: a thread pool only adds waiting
        km = KMeans(n_clusters=c, n_init=1, random_state=seed).fit(coords.astype(np.float64))
    lab = km.labels_
    sums = np.zeros((c, features.shape[1]))
    np.add.at(sums, lab, features)
    counts = np.bincount(lab, minlength=c)
    keep = counts > 0
    return (sums[keep] / counts[keep, None]).astype(np.float32), lab


def slide_bag(X: np.ndarray, tiles: pd.DataFrame, p: He2rnaParams) -> np.ndarray:
    """One slide's bag as the model sees it: its super-tiles (seeded k-means on x, y) or its tiles."""
    if not p.supertiles:
        return np.ascontiguousarray(X, np.float32)
    return supertiles(X, tiles[["x", "y"]].to_numpy(), p.supertiles, seed=p.seed)[0]


def sample_bags(store: Store, p: He2rnaParams, slides_per_sample: list[list[str]],
                tile_stats: dict | None = None) -> list[np.ndarray]:
    """Bags of every sample (its slides' bags concatenated), read through the store's feature loading.

    tile_stats, if given, receives the raw tiles' feature mean and std ('tile_mean', 'tile_std'):
    the scale tile scores standardise with when the net was trained on super-tiles.
    """
    from hefeat.learn.data import slide_tiles

    wanted = sorted({s for ss in slides_per_sample for s in ss})
    per_slide, n, s1, s2 = {}, 0, 0.0, 0.0
    for st in slide_tiles(store, p.extraction_id, wanted):
        per_slide[st.slide_id] = slide_bag(st.X, st.tiles, p)
        if tile_stats is not None:
            x = st.X.astype(np.float64)
            n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0)
    if tile_stats is not None and n:
        mean = s1 / n
        tile_stats.update(tile_mean=mean.astype(np.float32),
                          tile_std=(np.sqrt(np.maximum(s2 / n - mean**2, 0)) + 1e-6).astype(np.float32))
    return [np.concatenate([per_slide[s] for s in ss]) for ss in slides_per_sample]


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------
def fit_he2rna(store: Store, p: He2rnaParams, model_id: str) -> FitResult:
    """5-fold patient-grouped CV of HE2RNA; per-gene Pearson R vs an untrained-model null; final refit."""
    import torch

    from hefeat.learn.data import sample_targets, train_gene_filter
    from hefeat.learn.nets import derive_seed
    from hefeat.learn.splits import assert_disjoint, group_kfold
    from hefeat.learn.stats import columnwise_pearson, correct, empirical_p, r2_score_cols, r_pvalue
    from hefeat.store.atomic import atomic_path

    data = sample_targets(store, p.extraction_id, dataset=p.dataset, genes=list(p.genes) if p.genes else None,
                          transform=p.transform)
    ids, groups, Y, genes = data.ids, data.groups, data.Y.astype(np.float32), data.genes
    n_pat = len(np.unique(groups))
    if n_pat < max(3, p.folds):
        raise NotEstimable(f"{n_pat} patients have targets and features; {p.folds}-fold CV needs at least "
                           f"{max(3, p.folds)} (lower --folds or add slides)")
    tile_stats: dict = {}
    bags = sample_bags(store, p, data.slides, tile_stats if p.supertiles else None)
    n, G = len(ids), len(genes)
    folds = group_kfold(groups, p.folds, seed=p.seed)
    oof = np.full((n, G), np.nan)
    null_oof = [np.full((n, G), np.nan) for _ in range(p.n_untrained)]
    history = []
    kept = np.ones(G, bool)
    for i, f in enumerate(folds):
        assert_disjoint(groups, f.train, f.test)
        # The gene filter sees the training fold only.
        fk = train_gene_filter(Y[f.train], min_variance=p.min_variance, median_positive=p.median_positive)
        kept &= fk
        if not fk.any():
            continue
        cols = np.flatnonzero(fk)
        tr_bags = [bags[j] for j in f.train]
        te_bags = [bags[j] for j in f.test]
        est = p.estimator(derive_seed(p.seed, 10, i)).fit(tr_bags, Y[f.train][:, fk], groups[f.train])
        oof[np.ix_(f.test, cols)] = est.predict(te_bags)
        history.append(est.history_.assign(fold=f.name))
        for u in range(p.n_untrained):  # the untrained model of the same architecture: HE2RNA's null
            un = p.estimator(derive_seed(p.seed, 20, i, u)).set_params(epochs=0)
            null_oof[u][np.ix_(f.test, cols)] = un.fit(tr_bags, Y[f.train][:, fk], groups[f.train]).predict(te_bags)
    ev = np.flatnonzero(~np.isnan(oof).any(0) & kept)
    if not len(ev):
        raise NotEstimable("No gene passes the training-fold filters (median > 0, variance) in every fold; "
                           "use --no-median-positive or a lower --min-variance")
    gsel = [genes[j] for j in ev]
    # A constant prediction has no correlation: r stays NaN (not significant, no p), never r = 0; the
    # null pools the untrained models' defined correlations only.
    r = columnwise_pearson(oof[:, ev], Y[:, ev])
    null = np.concatenate([columnwise_pearson(nr[:, ev], Y[:, ev]) for nr in null_oof])
    null = null[np.isfinite(null)]
    p_null = empirical_p(r, null)
    split = f"patient-kfold:{len(folds)} seed={p.seed}"
    metrics = pd.DataFrame({"gene": gsel, "n": n, "pearson_r": r, "pearson_p": r_pvalue(r, n),
                            "p_vs_untrained": p_null, "r2": r2_score_cols(oof[:, ev], Y[:, ev])})
    metrics["p_bh"] = correct(p_null, "bh")
    metrics["p_holm_sidak"] = correct(p_null, "holm-sidak")
    metrics["significant"] = metrics["p_bh"] < p.fdr
    metrics["split"] = split
    # The deployed model: every sample (val_share of the patients for early stopping).
    final = p.estimator(derive_seed(p.seed, 30)).fit(bags, Y[:, ev], groups)
    history.append(final.history_.assign(fold="final"))
    store.model_dir(model_id).mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.model_file(store.root, model_id, layout.MODEL_NET)) as tmp:
        torch.save(final.state_dict(), tmp)
    summary = {"extraction_id": p.extraction_id, "n_samples": int(n), "n_genes": len(gsel),
               "n_significant": int(metrics["significant"].sum()), "fdr": p.fdr,
               "n_r2_above_0.2": int((metrics["r2"] > p.r2_threshold).sum()), "r2_threshold": p.r2_threshold,
               "median_pearson_r": float(np.nanmedian(r)) if np.isfinite(r).any() else None,
               "n_undefined_r": int(np.isnan(r).sum()),
               "median_untrained_r": float(np.median(null)) if len(null) else None, "split": split,
               "d_in": final.d_in_, "epochs_final": final.n_epochs_,
               "bag": f"{p.supertiles} super-tiles" if p.supertiles else "all tiles"}
    oof_df = pd.DataFrame(oof[:, ev], columns=gsel)
    oof_df.insert(0, "patient_id", groups)
    oof_df.insert(0, "sample_id", ids)
    notes = []
    if np.isnan(r).any():
        notes.append(f"{int(np.isnan(r).sum())} genes have constant out-of-fold predictions: their r is undefined "
                     "(NaN, not significant)")
    if len(ev) < G:
        notes.append(f"{G - len(ev)} of {G} genes failed the training-fold filter in some fold and are not evaluated")
    return FitResult(summary=summary, arrays={"genes": np.array(gsel), **tile_stats}, extraction_id=p.extraction_id,
                     notes=notes,
                     tables={"metrics": metrics, "oof_predictions": oof_df,
                             "training": pd.concat(history, ignore_index=True)})


def load_estimator(store: Store, mid: str):
    """(fitted He2rnaRegressor, params, model.json, genes) of a stored HE2RNA model."""
    import torch

    from hefeat.learn.models import load_model
    from hefeat.learn.registry import make_params

    meta = load_model(store, mid)
    p = make_params(He2rnaParams, meta["params"])
    genes = [str(g) for g in meta["arrays"]["genes"]]
    state = torch.load(layout.model_file(store.root, mid, layout.MODEL_NET), weights_only=True)
    est = p.estimator(p.seed).load_state(state, int(meta["summary"]["d_in"]), len(genes))
    return est, p, meta, genes


def predict_he2rna(store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Slide predictions as in cross-validation (same bags, k-averaged top-k) and every tile's score."""
    from hefeat.learn.data import slide_tiles
    from hefeat.learn.models import load_table

    est, p, meta, genes = load_estimator(store, mid)
    m = load_table(store, mid, "metrics")
    chosen = m.sort_values("pearson_r", ascending=False)["gene"].head(top).tolist()
    cols = [genes.index(g) for g in chosen]
    A = meta["arrays"]  # a super-tile net scores raw tiles standardised by the raw tiles' own statistics
    tile_scale = (A["tile_mean"], A["tile_std"]) if "tile_mean" in A else ()
    rows, n = [], 0
    with write_predictions(store, mid) as write_pred:
        for st in slide_tiles(store, meta["extraction_id"], slides):
            s = est.tile_scores(st.X, *tile_scale)
            df = pd.concat([st.tiles, pd.DataFrame(s[:, cols], columns=chosen)], axis=1)
            df.insert(0, "slide_id", st.slide_id)
            df.insert(0, "model_id", mid)
            write_pred(st.slide_id, df)
            rows.append(pd.Series(est.predict([slide_bag(st.X, st.tiles, p)])[0], index=genes, name=st.slide_id))
            n += len(df)
        sp = pd.DataFrame(rows)
        sp.index.name = "slide_id"
        write_pred.table("slide_predictions", sp.reset_index())  # committed with the tile predictions
    return {"model_id": mid, "slides": len(rows), "tiles": n, "tile_genes": chosen,
            "slide_value": f"k-averaged top-k over {meta['summary'].get('bag', 'the training bags')} (as in CV)"}


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    from hefeat.learn.report import gene_plots, learning_curve_plot

    return gene_plots(store, mid, out) + learning_curve_plot(store, mid, out, "training")


register(Method(
    name="he2rna", prefix="he2-", params=He2rnaParams, fit=fit_he2rna, headline=gene_headline, predict=predict_he2rna,
    plots=_plots, truth=True, units=expression_units,
    summary="HE2RNA: super-tiles, per-tile MLP, random top-k; patient CV vs an untrained-model null.",
    example="hefeat fit he2rna --extraction e1234 --supertiles 100 --ks 1,2,5,10,20,50,100",
))
