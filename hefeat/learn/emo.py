"""EMO-style per-gene expression heads from slide-mean embeddings (Wang et al., Cancer Research 2021).

Instead of one CNN per gene, one closed-form ridge head per gene on frozen features, with the gene's
penalty chosen by efficient leave-one-out on the training split. Evaluation follows the paper:
Spearman r per gene across patients on held-out data, one-sided, BH FDR; R² of the prediction;
proliferation score = mean of the 11 PAM50 proliferation genes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.data import (
    SlideLevelData,
    clinical_by_slide,
    median_shift,
    slide_level_data,
    train_gene_filter,
)
from hefeat.learn.models import (
    load_model,
    load_table,
    model_exists,
    model_id,
    model_summary,
    save_model,
)
from hefeat.learn.ridge import DEFAULT_ALPHAS, RidgeHeads
from hefeat.learn.splits import assert_disjoint, parse_split
from hefeat.learn.stats import (
    columnwise_spearman,
    correct,
    empirical_p,
    gene_metrics,
    gene_set_score,
    r_pvalue,
)
from hefeat.store.catalog import Store

PAM50_PROLIFERATION = ("BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C")
ALIASES = {"CDCA1": "NUF2", "KNTC2": "NDC80"}


@dataclass
class GenesParams:
    """Parameters of `hefeat fit genes` (all recorded with the model)."""

    extraction_id: str
    dataset: str = "expression"
    genes: list[str] | None = None
    min_variance: float = 0.01
    median_positive: bool = False
    transform: str = "log1p"
    split: str = "patient-kfold:5"
    level: str = "slide"
    pca: int | None = None
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    cohort_col: str | None = None
    unit: str = "sample"
    permutations: int = 0
    fdr: float = 0.05
    seed: int = 0


def _tile_level_predict(store: Store, eid: str, data: SlideLevelData, train: np.ndarray, test: np.ndarray,
                        keep: np.ndarray, alpha_slide: np.ndarray, Y: np.ndarray, cache: dict) -> np.ndarray:
    """EMO tile-level variant: heads trained on tiles with their slide's targets, predictions averaged per slide."""
    from hefeat.learn.ridge import fit_ridge_heads
    from hefeat.store.features import read_features

    def tiles_of(rows):
        Xs, Ys, owner = [], [], []
        for r in rows:
            for sid in data.slides[r]:
                if sid not in cache:  # every fold (and permutation) reuses a slide's tiles
                    cache[sid] = read_features(store.features_path(eid, sid))
                f = cache[sid]
                Xs.append(f)
                Ys.append(np.repeat(Y[r:r + 1, keep], len(f), 0))
                owner.append(np.full(len(f), r))
        return np.concatenate(Xs), np.concatenate(Ys), np.concatenate(owner)

    Xt, Yt, _ = tiles_of(train)
    per_slide = len(Xt) / max(len(train), 1)
    # Tile rows repeat each slide's target, so the slide-level LOO penalties scale by tiles per slide.
    fits = {}
    for a in np.unique(alpha_slide):
        cols = np.flatnonzero(alpha_slide == a)
        fits[a] = (cols, fit_ridge_heads(Xt, Yt[:, cols], alphas=[a * per_slide]))
    Xe, _, owner = tiles_of(test)
    out = np.zeros((len(test), keep.sum()))
    tile_pred = np.zeros((len(Xe), keep.sum()))
    for cols, f in fits.values():
        tile_pred[:, cols] = f.predict(Xe)
    for i, r in enumerate(test):
        out[i] = tile_pred[owner == r].mean(0)
    return out


def fit_genes(store: Store, params: GenesParams, *, truth: str | Path | None = None, force: bool = False) -> dict:
    """Cross-validated per-gene heads; stores the model, per-gene metrics and out-of-fold predictions."""
    t0 = time.perf_counter()
    if params.level not in ("slide", "tile"):
        raise HefeatError("--level must be slide or tile")
    pdict = asdict(params)
    mid = model_id("genes", pdict)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True, truth=truth)
    if params.unit not in ("sample", "patient"):
        raise HefeatError("--unit must be sample (one row per sample) or patient (slides and samples averaged)")
    if params.level == "tile" and params.unit == "patient":
        raise HefeatError("--level tile trains on each slide's tiles with its own sample's targets; use --unit sample")
    data = slide_level_data(store, params.extraction_id, dataset=params.dataset, genes=params.genes,
                            transform=params.transform, level=params.unit)
    n, g = data.Y.shape
    if n < 6:
        raise HefeatError(f"Only {n} samples have both targets and features; per-gene heads need at least 6")
    const = np.ptp(data.Y, 0) <= 1e-12 * (1 + np.abs(data.Y).max(0))
    if const.all():
        raise HefeatError("Every gene is constant across samples: nothing to predict")
    folds = parse_split(params.split, data.ids, data.groups, seed=params.seed)
    cohort = None
    if params.cohort_col:
        cohort = _cohort_labels(store, data, params.cohort_col)
    tiles_cache: dict = {}
    oof, kept, alphas, fold_of = _cross_validate(store, params, data, folds, cohort, data.Y, tiles_cache)
    if not kept.any():
        raise HefeatError(f"No gene passes the training-set filter (variance > {params.min_variance}"
                          f"{', median > 0' if params.median_positive else ''})")
    evaluated = np.flatnonzero(~np.isnan(oof).any(0) & kept)
    genes = [data.genes[j] for j in evaluated]
    Yeval = data.Y if cohort is None else median_shift(data.Y, cohort, np.arange(n))[0]
    split_name = f"{params.split} seed={params.seed}"
    metrics = gene_metrics(oof[:, evaluated], Yeval[:, evaluated], genes, split=split_name)
    metrics["alpha_median"] = np.median(alphas[:, evaluated], 0)
    metrics["significant"] = metrics["spearman_p_bh"] < params.fdr
    if params.permutations:
        # Null from permuted targets: the whole CV refitted on targets shuffled across samples.
        rng = np.random.default_rng(params.seed + 1)
        null = []
        for _ in range(params.permutations):
            Yp = data.Y[rng.permutation(n)]
            po, _, _, _ = _cross_validate(store, params, data, folds, cohort, Yp, tiles_cache)
            null.append(columnwise_spearman(po[:, evaluated], Yp[:, evaluated]))
        metrics["p_permutation"] = empirical_p(metrics["spearman_r"].to_numpy(), np.concatenate(null))
        metrics["p_permutation_bh"] = correct(metrics["p_permutation"].to_numpy(), "bh")
    # The deployed model: refit on every sample (metrics above are out-of-fold and stay honest).
    Yall = Yeval[:, evaluated]
    final = RidgeHeads(params.alphas, pca=params.pca, random_state=params.seed).fit(data.X, Yall)
    prolif = _proliferation(oof[:, evaluated], Yeval[:, evaluated], genes)
    members = [x for x in genes if ALIASES.get(x, x) in PAM50_PROLIFERATION]
    if len(members) >= 3 and len(genes) > len(members) + 5:
        gs = gene_set_score(metrics.set_index("gene")["spearman_r"], members, n_random=2000, seed=params.seed)
        prolif.update(proliferation_set_mean_r=gs["mean_r"], proliferation_set_random_mean_r=gs["random_mean"],
                      proliferation_set_p=gs["p_value"])
    summary = {
        "model_id": mid, "kind": "genes", "extraction_id": params.extraction_id, "n_samples": int(n),
        "n_genes": len(genes), "n_significant": int(metrics["significant"].sum()),
        "n_r2_above_0.2": int((metrics["r2"] > 0.2).sum()), "split": split_name, "level": params.level,
        "median_spearman_r": float(metrics["spearman_r"].median()), "unit": params.unit, **prolif,
    }
    oof_df = pd.DataFrame(oof[:, evaluated], columns=genes)
    oof_df.insert(0, "fold", fold_of)
    oof_df.insert(0, "patient_id", data.groups)
    oof_df.insert(0, "sample_id", data.ids)
    arrays = {"coef": final.fit_.coef.astype(np.float32), "intercept": final.fit_.intercept, "alpha": final.alpha_,
              "genes": np.array(genes)}
    if final.pca_ is not None:
        arrays.update(pca_components=final.pca_.components_, pca_mean=final.pca_.mean_)
    save_model(store, mid, kind="genes", params=pdict, summary=summary, arrays=arrays,
               tables={"metrics": metrics, "oof_predictions": oof_df}, extraction_id=params.extraction_id,
               seconds=round(time.perf_counter() - t0, 3))
    return model_summary(store, mid, cached=False, truth=truth)


def _cross_validate(store: Store, params: GenesParams, data: SlideLevelData, folds, cohort, Ytarget: np.ndarray,
                    cache: dict):
    """Out-of-fold predictions; filters, median shifts and penalties use each fold's training part only.

    `cache` keeps each slide's tile features for the tile-level variant across folds and permutations.
    """
    n, g = Ytarget.shape
    oof = np.full((n, g), np.nan)
    kept = np.ones(g, bool)
    alphas = np.zeros((len(folds), g))
    fold_of = np.full(n, "", object)
    for i, f in enumerate(folds):
        assert_disjoint(data.groups, f.train, f.test)
        Y = Ytarget
        if cohort is not None:
            Y, _ = median_shift(Y, cohort, f.train)
        keep = train_gene_filter(Y[f.train], min_variance=params.min_variance, median_positive=params.median_positive)
        kept &= keep
        heads = RidgeHeads(params.alphas, pca=params.pca, random_state=params.seed).fit(data.X[f.train], Y[f.train][:, keep])
        alphas[i, keep] = heads.alpha_
        cols = np.flatnonzero(keep)
        if params.level == "slide":
            oof[np.ix_(f.test, cols)] = heads.predict(data.X[f.test])
        else:
            oof[np.ix_(f.test, cols)] = _tile_level_predict(store, params.extraction_id, data, f.train, f.test, keep,
                                                            heads.alpha_, Y, cache)
        fold_of[f.test] = f.name
    return oof, kept, alphas, fold_of


def _cohort_labels(store: Store, data: SlideLevelData, col: str) -> np.ndarray:
    if col == "site":
        return data.sites
    clin = clinical_by_slide(store)
    if col not in clin.columns:
        raise HefeatError(f"Cohort column {col!r} is neither 'site' nor a clinical column")
    m = clin.set_index("slide_id")[col]
    return np.array([str(m[s[0]]) if s[0] in m.index and pd.notna(m[s[0]]) else "NA" for s in data.slides])


def _proliferation(pred: np.ndarray, true: np.ndarray, genes: list[str]) -> dict:
    names = [ALIASES.get(g, g) for g in genes]
    idx = [i for i, g in enumerate(names) if g in PAM50_PROLIFERATION]
    if len(idx) < 3:
        return {"proliferation_genes": len(idx)}
    p, t = pred[:, idx].mean(1), true[:, idx].mean(1)
    r = float(columnwise_spearman(p[:, None], t[:, None])[0])
    return {"proliferation_genes": len(idx), "proliferation_spearman_r": r,
            "proliferation_p": float(r_pvalue(np.array([r]), len(p))[0])}


def predict_genes(store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20,
                  genes: list[str] | None = None) -> dict:
    """Tile-level (EMO-spatial) predictions for the best genes into predictions/, slide-level for all genes."""
    from hefeat.store.features import iter_slide_features
    from hefeat.store.tables import write_parquet

    meta = load_model(store, mid)
    A = meta["arrays"]
    all_genes = [str(x) for x in A["genes"]]
    eid = meta["extraction_id"]
    tid = store.extraction(eid)["tiling_id"]
    metrics = load_table(store, mid, "metrics")
    chosen = genes or metrics.sort_values("spearman_r", ascending=False)["gene"].head(top).tolist()
    missing = sorted(set(chosen) - set(all_genes))
    if missing:
        raise HefeatError(f"Model {mid} has no head for: {', '.join(missing[:10])}")
    cols = [all_genes.index(x) for x in chosen]
    coef, b = A["coef"].astype(np.float64), A["intercept"]
    slide_rows, n_tiles = [], 0
    for sid, F in iter_slide_features(store, eid, slides):
        X = F.astype(np.float64)
        if "pca_components" in A:
            X = (X - A["pca_mean"]) @ A["pca_components"].T
        tile_pred = X[:, :] @ coef[:, cols] + b[cols]
        tiles = store.tiles(tid, sid)[["tile_id", "x", "y"]]
        df = pd.concat([tiles.reset_index(drop=True), pd.DataFrame(tile_pred, columns=chosen)], axis=1)
        df.insert(0, "slide_id", sid)
        df.insert(0, "model_id", mid)
        write_parquet(df, store.predictions_path(mid, sid))
        slide_rows.append(pd.Series(X.mean(0) @ coef + b, index=all_genes, name=sid))
        n_tiles += len(df)
    slide_df = pd.DataFrame(slide_rows)
    slide_df.index.name = "slide_id"
    write_parquet(slide_df.reset_index(), store.model_dir(mid) / "slide_predictions.parquet")
    return {"model_id": mid, "slides": len(slide_rows), "tiles": n_tiles, "tile_genes": chosen}
