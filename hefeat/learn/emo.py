"""EMO-style per-gene expression heads from slide-mean embeddings (Wang et al., Cancer Research 2021).

Instead of one CNN per gene, one closed-form ridge head per gene on frozen features, with the gene's
penalty chosen by efficient leave-one-out on the training split. Evaluation follows the paper:
Spearman r per gene across patients on held-out data, one-sided, BH FDR; R² of the prediction;
proliferation score = mean of the 11 PAM50 proliferation genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.data import SlideLevelData
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

PAM50_PROLIFERATION = ("BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C")
ALIASES = {"CDCA1": "NUF2", "KNTC2": "NDC80"}
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
SPLIT_KINDS = ("patient-kfold", "holdout", "loo", "leave-one-patient-out")


def gene_list(value: str) -> tuple[str, ...] | None:
    """--genes: 'all' (None), a file with one gene per line, or a comma-separated list."""
    if value == "all":
        return None
    p = Path(value)
    if p.exists():
        return tuple(g.strip() for g in p.read_text().split() if g.strip())
    if "," in value or value.replace("-", "").replace(".", "").isalnum():
        return tuple(g.strip() for g in value.split(",") if g.strip())
    raise HefeatError(f"--genes: {value!r} is neither 'all', a file nor a comma-separated gene list")


def check_split(spec: str) -> None:
    """Validate a split spec's syntax (the data decide the rest)."""
    kind, _, arg = spec.partition(":")
    if kind not in SPLIT_KINDS:
        raise HefeatError(f"Unknown split {spec!r}: use patient-kfold:5, holdout:FILE or leave-one-patient-out")
    if kind == "patient-kfold" and arg and not arg.isdigit():
        raise HefeatError(f"patient-kfold needs an integer k, got {arg!r}")
    if kind == "holdout" and not arg:
        raise HefeatError("holdout needs a file: holdout:test_patients.txt")


@dataclass(frozen=True, kw_only=True)
class GenesParams(Params):
    """Parameters of `hefeat fit genes` (all recorded with the model)."""

    extraction_id: str = param(help="Extraction whose slide-mean embeddings are the features.", flag="--extraction")
    dataset: str = param("expression", "Expression dataset (target table).", flag="--target")
    genes: tuple[str, ...] | None = param(None, "all, a file with one gene per line, or A,B,C.", parse=gene_list)
    min_variance: float = param(0.01, "Keep genes whose variance on the training fold exceeds this.")
    median_positive: bool = param(False, "Also require a training-fold median > 0.")
    transform: Literal["log1p", "log10p", "log2p", "none"] = param("log1p", "Target transform.",
                                                                   choices=("log1p", "log10p", "log2p", "none"))
    split: str = param("patient-kfold:5", "patient-kfold:K, holdout:FILE or leave-one-patient-out.", file=True)
    level: Literal["slide", "tile"] = param("slide", "slide: EMO-average; tile: heads on tiles with slide targets.",
                                            choices=("slide", "tile"))
    pca: int | None = param(None, "Principal components of the features fitted first (training fold only).")
    alphas: tuple[float, ...] = param(DEFAULT_ALPHAS, "Candidate ridge penalties (each gene picks by LOO).")
    cohort_col: str | None = param(None, "Median-shift cohorts defined by this column (EMO), e.g. site.")
    unit: Literal["sample", "patient"] = param("sample", "patient: average a patient's slides and samples.",
                                               choices=("sample", "patient"))
    permutations: int = param(0, "Permuted-target refits of the whole CV for an empirical null.")
    fdr: float = param(0.05, "False discovery rate at which a gene is called significant (BH, one-sided).")
    r2_threshold: float = param(0.2, "R² reported as 'genes with R² above' (the paper's 0.2).")
    n_random_sets: int = param(2000, "Random gene lists for the proliferation-set null.")
    seed: int = param(0, "Seed of the folds, PCA and permutations.")

    def validate(self) -> None:
        check_split(self.split)
        check_range("--fdr", self.fdr, 0, 1, lo_open=True, hi_open=True)
        check_range("--min-variance", self.min_variance, 0)
        check_range("--permutations", self.permutations, 0)
        check_range("--n-random-sets", self.n_random_sets, 1)
        if not self.alphas or min(self.alphas) <= 0:
            raise HefeatError("--alphas must be positive penalties")
        if self.pca is not None:
            check_range("--pca", self.pca, 1)
        if self.level == "tile" and self.unit == "patient":
            raise HefeatError("--level tile trains on each slide's tiles with its own sample's targets; use --unit sample")


# ----------------------------------------------------------------------------------------------
# Fit: data assembly -> estimator (RidgeHeads) -> cross-validated evaluation -> FitResult
# ----------------------------------------------------------------------------------------------
def fit_genes(store: Store, params: GenesParams, model_id: str) -> FitResult:
    """Cross-validated per-gene heads; per-gene metrics, out-of-fold predictions, the refitted heads."""
    from hefeat.learn.data import slide_level_data
    from hefeat.learn.ridge import RidgeHeads
    from hefeat.learn.splits import parse_split
    from hefeat.learn.stats import (
        columnwise_spearman,
        correct,
        empirical_p,
        gene_metrics,
        gene_set_score,
    )

    p = params
    data = slide_level_data(store, p.extraction_id, dataset=p.dataset, genes=list(p.genes) if p.genes else None,
                            transform=p.transform, level=p.unit)
    n, _ = data.Y.shape
    if n < 6:
        raise NotEstimable(f"Only {n} samples have both targets and features; per-gene heads need at least 6 "
                           "(ingest more samples or extract the missing slides)")
    const = np.ptp(data.Y, 0) <= 1e-12 * (1 + np.abs(data.Y).max(0))
    if const.all():
        raise NotEstimable("Every gene is constant across samples: nothing to predict")
    folds = parse_split(p.split, data.ids, data.groups, seed=p.seed)
    cohort = _cohort_labels(store, data, p.cohort_col) if p.cohort_col else None
    tiles_cache: dict = {}
    oof, kept, alphas, fold_of = _cross_validate(store, p, data, folds, cohort, data.Y, tiles_cache)
    if not kept.any():
        raise NotEstimable(f"No gene passes the training-fold filter (variance > {p.min_variance}"
                           f"{', median > 0' if p.median_positive else ''}) in every fold; lower --min-variance")
    # Rows some fold tested (a holdout split tests only its held-out rows; training rows have no
    # out-of-fold prediction and must not disqualify a gene).
    tested = np.flatnonzero(fold_of != "")
    evaluated = np.flatnonzero(~np.isnan(oof[tested]).any(0) & kept)
    genes = [data.genes[j] for j in evaluated]
    # Pooled out-of-fold predictions: one all-sample shift (see METHODS.md, emo).
    Yeval = _shift_all(data.Y, cohort)
    # Correlations are across patients: a patient's samples (all in one test fold) are averaged first,
    # so n counts patients, not samples.
    to_patients = _patient_means(data.groups[tested])
    n_units = len(np.unique(data.groups[tested]))
    split_name = f"{p.split} seed={p.seed}"
    metrics = gene_metrics(to_patients(oof[np.ix_(tested, evaluated)]), to_patients(Yeval[np.ix_(tested, evaluated)]),
                           genes, split=split_name)
    metrics["alpha_median"] = np.median(alphas[:, evaluated], 0)
    # The paper's calls: BH FDR on the one-sided Spearman p, and R² above the threshold; both reported.
    metrics["significant"] = metrics["spearman_p_bh"] < p.fdr
    metrics["significant_r2"] = metrics["significant"] & (metrics["r2"] > p.r2_threshold)
    if p.permutations:
        # Null from permuted targets: the whole CV refitted on targets shuffled across samples, scored
        # exactly as the observed statistic (same all-sample median shift, same patient means).
        rng = np.random.default_rng([p.seed, 1])
        null = []
        for _ in range(p.permutations):
            Yp = data.Y[rng.permutation(n)]
            po, _, _, _ = _cross_validate(store, p, data, folds, cohort, Yp, tiles_cache)
            null.append(columnwise_spearman(to_patients(po[np.ix_(tested, evaluated)]),
                                            to_patients(_shift_all(Yp, cohort)[np.ix_(tested, evaluated)])))
        null = np.concatenate(null)
        metrics["p_permutation"] = empirical_p(metrics["spearman_r"].to_numpy(), null)
        metrics["p_permutation_bh"] = correct(metrics["p_permutation"].to_numpy(), "bh")
    # The deployed model: refit on every sample (metrics above are out-of-fold and stay honest).
    final = RidgeHeads(p.alphas, pca=p.pca, random_state=p.seed).fit(data.X, Yeval, cols=evaluated)
    prolif = _proliferation(to_patients(oof[np.ix_(tested, evaluated)]), to_patients(Yeval[np.ix_(tested, evaluated)]),
                            genes)
    members = [x for x in genes if ALIASES.get(x, x) in PAM50_PROLIFERATION]
    if len(members) >= 3 and len(genes) > len(members) + 5:
        gs = gene_set_score(metrics.set_index("gene")["spearman_r"], members, n_random=p.n_random_sets, seed=p.seed)
        prolif.update(proliferation_set_mean_r=gs["mean_r"], proliferation_set_random_mean_r=gs["random_mean"],
                      proliferation_set_p=gs["p_value"])
    summary = {
        "extraction_id": p.extraction_id, "n_samples": int(n), "n_tested": len(tested), "n_genes": len(genes),
        "n_patients_tested": n_units, "n_significant": int(metrics["significant"].sum()), "fdr": p.fdr,
        "n_r2_above_0.2": int((metrics["r2"] > p.r2_threshold).sum()), "r2_threshold": p.r2_threshold,
        "n_significant_r2": int(metrics["significant_r2"].sum()),
        "split": split_name, "level": p.level, "median_spearman_r": float(metrics["spearman_r"].median()),
        "unit": p.unit, **prolif,
    }
    oof_df = pd.DataFrame(oof[np.ix_(tested, evaluated)], columns=genes)
    oof_df.insert(0, "fold", fold_of[tested])
    oof_df.insert(0, "patient_id", data.groups[tested])
    oof_df.insert(0, "sample_id", data.ids[tested])
    arrays = {"coef": final.coef_.astype(np.float32), "intercept": final.intercept_, "alpha": final.alpha_,
              "genes": np.array(genes)}
    if final.pca_ is not None:
        arrays.update(pca_components=final.pca_.components_, pca_mean=final.pca_.mean_)
    notes = []
    if len(genes) < kept.size:
        notes.append(f"{kept.size - len(genes)} of {kept.size} genes failed the training-fold filter in some fold "
                     "and are not evaluated")
    tables = {"metrics": metrics, "oof_predictions": oof_df}
    if p.permutations:  # per-gene r under permuted targets: the null the report draws
        tables["null"] = pd.DataFrame({"spearman_r": null})
    return FitResult(summary=summary, arrays=arrays, tables=tables, extraction_id=p.extraction_id, notes=notes)


def _shift_all(Y: np.ndarray, cohort: np.ndarray | None) -> np.ndarray:
    """Targets as pooled out-of-fold predictions are scored against: one median shift over all rows."""
    from hefeat.learn.data import median_shift

    return Y if cohort is None else median_shift(Y, cohort, np.arange(len(Y)))[0]


def _patient_means(groups: np.ndarray):
    """A function averaging rows (n, g) per patient (patients sorted); identity when every patient has one row."""
    ug, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(ug) == len(inv):
        return lambda A: A
    counts = np.bincount(inv, minlength=len(ug)).astype(float)

    def mean(A: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ug), A.shape[1]))
        np.add.at(out, inv, A)
        return out / counts[:, None]

    return mean


def _cross_validate(store: Store, params: GenesParams, data: SlideLevelData, folds, cohort, Ytarget: np.ndarray,
                    cache: dict):
    """Out-of-fold predictions; filters, median shifts and penalties use each fold's training part only.

    `cache` keeps each slide's tile features for the tile-level variant across folds and permutations.
    """
    from hefeat.learn.data import median_shift, train_gene_filter
    from hefeat.learn.ridge import RidgeHeads
    from hefeat.learn.splits import assert_disjoint

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
        if not keep.any():
            continue
        heads = RidgeHeads(params.alphas, pca=params.pca, random_state=params.seed).fit(
            data.X[f.train], Y, rows=f.train, cols=np.flatnonzero(keep))  # Y's rows/genes read in chunks, not copied
        alphas[i, keep] = heads.alpha_
        cols = np.flatnonzero(keep)
        if params.level == "slide":
            oof[np.ix_(f.test, cols)] = heads.predict(data.X[f.test])
        else:
            oof[np.ix_(f.test, cols)] = _tile_level_predict(store, params.extraction_id, data, f.train, f.test, keep,
                                                            heads.alpha_, Y, cache)
        fold_of[f.test] = f.name
    return oof, kept, alphas, fold_of


def _tile_level_predict(store: Store, eid: str, data: SlideLevelData, train: np.ndarray, test: np.ndarray,
                        keep: np.ndarray, alpha_slide: np.ndarray, Y: np.ndarray, cache: dict) -> np.ndarray:
    """EMO tile-level variant: heads trained on tiles with their slide's targets, predictions averaged per slide."""
    from hefeat.learn.data import slide_tiles
    from hefeat.learn.ridge import fit_ridge_heads

    need = sorted({sid for r in np.concatenate([train, test]) for sid in data.slides[r]} - set(cache))
    for st in slide_tiles(store, eid, need):  # every fold (and permutation) reuses a slide's tiles
        cache[st.slide_id] = st.X

    def tiles_of(rows):
        Xs, Ys, owner = [], [], []
        for r in rows:
            for sid in data.slides[r]:
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


def _cohort_labels(store: Store, data: SlideLevelData, col: str) -> np.ndarray:
    from hefeat.learn.data import clinical_by_slide

    if col == "site":
        return data.sites
    clin = clinical_by_slide(store)
    if col not in clin.columns:
        raise HefeatError(f"Cohort column {col!r} is neither 'site' nor a clinical column")
    m = clin.set_index("slide_id")[col]
    return np.array([str(m[s[0]]) if s[0] in m.index and pd.notna(m[s[0]]) else "NA" for s in data.slides])


def _proliferation(pred: np.ndarray, true: np.ndarray, genes: list[str]) -> dict:
    from hefeat.learn.stats import columnwise_spearman, r_pvalue

    names = [ALIASES.get(g, g) for g in genes]
    idx = [i for i, g in enumerate(names) if g in PAM50_PROLIFERATION]
    if len(idx) < 3:
        return {"proliferation_genes": len(idx)}
    p, t = pred[:, idx].mean(1), true[:, idx].mean(1)
    r = float(columnwise_spearman(p[:, None], t[:, None])[0])
    return {"proliferation_genes": len(idx), "proliferation_spearman_r": r,
            "proliferation_p": float(r_pvalue(np.array([r]), len(p))[0])}


# ----------------------------------------------------------------------------------------------
# Predict, headline, registration
# ----------------------------------------------------------------------------------------------
def predict_genes(store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20,
                  genes: list[str] | None = None) -> dict:
    """Tile-level (EMO-spatial) predictions for the best genes into predictions/, slide-level for all genes."""
    from hefeat.learn.data import slide_tiles
    from hefeat.learn.models import load_model, load_table
    from hefeat.store.tables import write_parquet

    meta = load_model(store, mid)
    A = meta["arrays"]
    all_genes = [str(x) for x in A["genes"]]
    eid = meta["extraction_id"]
    metrics = load_table(store, mid, "metrics")
    chosen = genes or metrics.sort_values("spearman_r", ascending=False)["gene"].head(top).tolist()
    missing = sorted(set(chosen) - set(all_genes))
    if missing:
        raise HefeatError(f"Model {mid} has no head for: {', '.join(missing[:10])}")
    cols = [all_genes.index(x) for x in chosen]
    coef, b = A["coef"].astype(np.float64), A["intercept"]
    slide_rows, n_tiles = [], 0
    with write_predictions(store, mid) as write_pred:
        for st in slide_tiles(store, eid, slides):
            X = st.X.astype(np.float64)
            if "pca_components" in A:
                X = (X - A["pca_mean"]) @ A["pca_components"].T
            tile_pred = X @ coef[:, cols] + b[cols]
            df = pd.concat([st.tiles, pd.DataFrame(tile_pred, columns=chosen)], axis=1)
            df.insert(0, "slide_id", st.slide_id)
            df.insert(0, "model_id", mid)
            write_pred(st.slide_id, df)
            slide_rows.append(pd.Series(X.mean(0) @ coef + b, index=all_genes, name=st.slide_id))
            n_tiles += len(df)
    slide_df = pd.DataFrame(slide_rows)
    slide_df.index.name = "slide_id"
    write_parquet(slide_df.reset_index(), layout.model_table_path(store.root, mid, "slide_predictions"))
    return {"model_id": mid, "slides": len(slide_rows), "tiles": n_tiles, "tile_genes": chosen}


def gene_headline(s: dict) -> str:
    """Headline of a gene-level model (genes, he2rna): calls at the FDR, R² count, proliferation."""
    fdr = s.get("fdr", 0.05)
    test = "one-sided" if s["kind"] == "genes" else "vs the untrained-model null"
    text = (f"{s['n_significant']} of {s['n_genes']} genes significant at FDR {fdr:g} ({test}, {s['split']}); "
            f"{s.get('n_r2_above_0.2', 'n/a')} genes with R² > {s.get('r2_threshold', 0.2):g}")
    if "n_significant_r2" in s:
        text += f"; {s['n_significant_r2']} pass both (the paper's rule)"
    if "proliferation_spearman_r" in s:
        text += f"; proliferation score Spearman r = {s['proliferation_spearman_r']:.2f}"
    return text


TRANSFORM_TEXT = {"log1p": "log(1 + x)", "log10p": "log10(1 + x)", "log2p": "log2(1 + x)", "none": "x"}


def expression_units(params: dict, column: str) -> str:
    """Units of a gene column of a gene-level model's tile predictions."""
    what = "measured" if column.startswith("measured_") else "predicted"
    x = f"{params.get('dataset', 'expression')} value"
    return f"{what} {TRANSFORM_TEXT.get(params.get('transform', 'log1p'), '?').replace('x', x)}"


def _holdout_file(store: Store, p: GenesParams) -> dict:
    """A holdout split's file content is an input: a changed file must change the model id."""
    kind, _, arg = p.split.partition(":")
    if kind != "holdout":
        return {}
    path = Path(arg)
    if not path.exists():
        raise HefeatError(f"Holdout file not found: {arg}")
    import hashlib

    return {"holdout": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    from hefeat.learn.report import gene_plots

    return gene_plots(store, mid, out)


register(Method(
    name="genes", prefix="gen-", params=GenesParams, fit=fit_genes, headline=gene_headline, predict=predict_genes,
    plots=_plots, inputs=_holdout_file, truth=True, units=expression_units,
    summary="Per-gene ridge heads on slide-mean embeddings (EMO-average), cross-validated by patient.",
    example="hefeat fit genes --extraction e1234 --split patient-kfold:5 --truth data/demo/truth.json",
))
