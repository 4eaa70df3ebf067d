"""EMO-style per-gene expression heads from slide-mean embeddings (Wang et al., Cancer Research 2021).

Instead of one CNN per gene, one closed-form ridge head per gene on frozen features, with the gene's
penalty chosen by efficient leave-one-out on the training split. Evaluation follows the paper:
Spearman r per gene across patients on held-out data, one-sided, BH FDR; R² of the prediction;
proliferation score = mean of the 11 PAM50 proliferation genes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.aggregate import patient_means
from hefeat.learn.data import SlideLevelData
from hefeat.learn.emo_cv import GeneCV, final_design, shift_all
from hefeat.learn.genesets import ALIASES, PAM50_PROLIFERATION
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
from hefeat.store.predictions import write_predictions

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
CHUNK_BYTES = 128 << 20  # float64 targets of one gene chunk of the streamed CV (n x chunk x 8 bytes)


def fit_genes(store: Store, params: GenesParams, model_id: str) -> FitResult:
    """Cross-validated per-gene heads; per-gene metrics, out-of-fold predictions, the refitted heads.

    Everything that scales with samples x genes streams over gene chunks (every statistic is per gene):
    each chunk runs the whole CV, its metrics, the final refit and the permuted-target CVs against
    decompositions built once per fold, so memory holds the targets, the out-of-fold predictions (a
    result) and a few chunk-sized arrays, never samples x genes copies. The chunks run with numpy's
    huge-page advice off (learn/hugepages.py: their temporaries' fresh pages are zeroed 4 KiB at a time); the
    arrays that live through the fit (targets, out-of-fold predictions) keep it. They also run with freed memory
    kept for reuse (hefeat.heap): in-process on the 10,000-slide store, 38.9-42.1 s against 40.5-44.0 s without,
    half the kernel time, peak RSS +0.15 GB; outputs bit-identical.
    """
    from hefeat.heap import reuse_freed_memory
    from hefeat.learn import stats
    from hefeat.learn.data import slide_level_data
    from hefeat.learn.hugepages import no_hugepage_advice
    from hefeat.learn.splits import parse_split

    p = params
    data = slide_level_data(store, p.extraction_id, dataset=p.dataset, genes=list(p.genes) if p.genes else None,
                            transform=p.transform, level=p.unit)
    n, g = data.Y.shape
    if n < 6:
        raise NotEstimable(f"Only {n} samples have both targets and features; per-gene heads need at least 6 "
                           "(ingest more samples or extract the missing slides)")
    hi, lo = data.Y.max(0), data.Y.min(0)
    if ((hi - lo) <= 1e-12 * (1 + np.maximum(np.abs(hi), np.abs(lo)))).all():
        raise NotEstimable("Every gene is constant across samples: nothing to predict")
    folds = parse_split(p.split, data.ids, data.groups, seed=p.seed)
    cohort = _cohort_labels(store, data, p.cohort_col) if p.cohort_col else None
    cv = GeneCV(store, p, data, folds, cohort)
    # Rows some fold tested (a holdout split tests only its held-out rows; training rows have no
    # out-of-fold prediction and must not disqualify a gene).
    fold_of = np.full(n, "", object)
    for f in folds:
        fold_of[f.test] = f.name
    tested = np.flatnonzero(fold_of != "")
    # Correlations are across patients: a patient's samples (all in one test fold) are averaged first,
    # so n counts patients, not samples.
    to_patients = patient_means(data.groups[tested], tested)
    n_units = len(np.unique(data.groups[tested]))
    # Null from permuted targets: the whole CV refitted on targets shuffled across samples, scored
    # exactly as the observed statistic (same all-sample median shift, same patient means).
    rng = np.random.default_rng([p.seed, 1])
    perms = [rng.permutation(n) for _ in range(p.permutations)]
    # Every sample tested and its own unit, no cohort shift: a null's truth (units = rows perm of the targets) is the
    # observed truth re-ordered, and Spearman r does not change when both sides are re-ordered alike. So each null pairs
    # the predictions' rows perm⁻¹ with the observed truth, whose ranks are made once per chunk (exactly the same r:
    # the rank sums are exact in float64, `stats._spearman_ranked`).
    unpermute = [np.argsort(q) for q in perms] if cohort is None and n_units == len(tested) == n else None
    final = final_design(data.X, p)
    # Every chunk writes all its rows (NaN where no fold tested them). Gene-major: a chunk's columns are one
    # contiguous block, and the saved table's columns are the array's own (no column-major copy of n x g to write it).
    oof = np.empty((n, g), order="F")
    kept = np.zeros(g, bool)
    evaluated_mask = np.zeros(g, bool)
    alphas = np.zeros((len(folds), g))
    cols = {}
    null = np.full((len(perms), g), np.nan)
    coef = np.zeros((final.basis.p, g))
    intercept, alpha_final = np.zeros(g), np.zeros(g)
    # Gene chunks on every core at once, each on one BLAS thread with its ridge fits serial: every step of a chunk
    # (sums, gathers, patient means, metrics, fits) has a core; one chunk at a time left one idle in its serial steps.
    workers = 1 if p.level == "tile" else chunk_threads(g)
    step = g if p.level == "tile" else int(max(1, min(g, CHUNK_BYTES // (8 * n) // workers)))
    fit_threads = None if workers == 1 else 1

    scratch = threading.local()  # each chunk thread's buffers, reused chunk after chunk (below)

    def one(j0: int, data=data, cv=cv, oof=oof) -> tuple:  # (bound here: the names are deleted below)
        k = min(step, g - j0)
        if not hasattr(scratch, "buffers"):
            # The chunk-sized arrays every chunk remakes (targets, their float32 copy, a null's predictions), made once
            # per thread: fresh pages cost a fault each to zero, 1.2 GB per 10,000 x 20,000 pass of each.
            scratch.buffers = (np.empty((step, n)), np.empty((step, n), np.float32), np.empty((n, step)))
        yt, y32, pred = scratch.buffers
        # gene-major (Fortran-ordered): the ridge gathers each fold's rows per gene
        Yc = stats.transposed_copy(data.Y[:, j0:j0 + k], yt[:k]).T
        ch = cv.begin_chunk(Yc, y32[:k])
        o, keep, al = ch.run(Yc, out=oof[:, j0:j0 + k], threads=fit_threads)  # in place: no chunk-sized copy
        kept[j0:j0 + k] = keep.all(0)
        alphas[:, j0:j0 + k] = al
        ev = np.flatnonzero(kept[j0:j0 + k] & ~np.isnan(o if len(tested) == n else o[tested]).any(0))
        if not len(ev):
            return ev, {}
        evaluated_mask[j0 + ev] = True
        # Pooled out-of-fold predictions: one all-sample shift (see METHODS.md, emo).
        Ye = shift_all(Yc, cohort)
        truth = to_patients(Ye, ev)
        ranks = stats.gene_ranks(truth) if unpermute is not None else None  # ranked once: the nulls reuse them
        metrics = stats.gene_metric_columns(to_patients(o, ev), truth, true_ranks=ranks)
        del truth
        # The deployed model: refit on every sample (metrics are out-of-fold and stay honest).
        heads = final.basis.fit(Ye, cols=ev, xty=ch.final_xty(ev), sums=ch.final_sums(ev), threads=fit_threads)
        coef[:, j0 + ev], intercept[j0 + ev], alpha_final[j0 + ev] = heads.coef, heads.intercept, heads.alpha
        for i, perm in enumerate(perms):
            if ch.sums:  # the permuted targets are read as rows perm of Yc, never copied whole
                po, _, _ = ch.run(Yc, perm, out=pred[:, :k], threads=fit_threads)
            else:
                Yp = Yc.T.take(perm, axis=1).T  # permuted rows, still gene-major
                po, _, _ = ch.run(Yp, out=pred[:, :k], threads=fit_threads)
            if unpermute is not None:  # the pairs (po[i], Yc[perm[i]]) put back in row order: the observed truth
                null[i, j0 + ev] = stats.columnwise_spearman(to_patients(po, ev, unpermute[i]), None, true_ranks=ranks)
            else:
                true = to_patients(Yc, ev, perm) if ch.sums else to_patients(shift_all(Yp, cohort), ev)
                null[i, j0 + ev] = stats.columnwise_spearman(to_patients(po, ev), true)
        return j0 + ev, metrics

    starts = list(range(0, g, step))
    with no_hugepage_advice(), reuse_freed_memory():
        if workers == 1:
            done = [one(j0) for j0 in starts]
        else:
            from hefeat.learn.threads import single_blas_thread, thread_map

            with single_blas_thread():
                # each basis's shared factors first, the bases on threads (a basis builds its own under its lock)
                thread_map(lambda d: d.basis.parts, [*cv.designs, final], workers)
                done = thread_map(one, starts, workers)
    del one
    for at, metrics in done:  # per-gene metrics of each chunk's evaluated genes
        for name, v in metrics.items():
            cols.setdefault(name, np.full(g, np.nan))[at] = v
    if not kept.any():
        raise NotEstimable(f"No gene passes the training-fold filter (variance > {p.min_variance}"
                           f"{', median > 0' if p.median_positive else ''}) in every fold; lower --min-variance")
    evaluated = np.flatnonzero(evaluated_mask)
    genes = [data.genes[j] for j in evaluated]
    split_name = f"{p.split} seed={p.seed}"
    metrics = stats.gene_metrics_table({k: v[evaluated] for k, v in cols.items()}, genes, n_units,
                                       split=split_name)
    metrics["alpha_median"] = np.median(alphas[:, evaluated], 0)
    # The paper's calls: BH FDR on the one-sided Spearman p, and R² above the threshold; both reported.
    metrics["significant"] = metrics["spearman_p_bh"] < p.fdr
    metrics["significant_r2"] = metrics["significant"] & (metrics["r2"] > p.r2_threshold)
    if p.permutations:
        null = null[:, evaluated].ravel()  # per-gene r under permuted targets, permutation after permutation
        metrics["p_permutation"] = stats.empirical_p(metrics["spearman_r"].to_numpy(), null)
        metrics["p_permutation_bh"] = stats.correct(metrics["p_permutation"].to_numpy(), "bh")
    names = [ALIASES.get(x, x) for x in genes]
    pro = evaluated[[i for i, x in enumerate(names) if x in PAM50_PROLIFERATION]]
    prolif = {"proliferation_genes": len(pro)} if len(pro) < 3 else _proliferation(
        to_patients(oof, pro), to_patients(shift_all(data.Y[:, pro], cohort)),
        [data.genes[j] for j in pro])
    members = [x for x in genes if ALIASES.get(x, x) in PAM50_PROLIFERATION]
    if len(members) >= 3 and len(genes) > len(members) + 5:
        gs = stats.gene_set_score(metrics.set_index("gene")["spearman_r"], members, n_random=p.n_random_sets,
                                  seed=p.seed)
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
    ids, groups = data.ids, data.groups
    del data, cv  # the targets are not needed any more (the caller holds no other reference in a real fit)
    whole = len(tested) == n and len(evaluated) == g  # the out-of-fold table is then the array itself, not a copy
    oof_df = pd.DataFrame(oof if whole else oof[np.ix_(tested, evaluated)], columns=genes, copy=False)
    del oof
    oof_df.insert(0, "fold", fold_of[tested])
    oof_df.insert(0, "patient_id", groups[tested])
    oof_df.insert(0, "sample_id", ids[tested])
    arrays = {"coef": coef[:, evaluated].astype(np.float32), "intercept": intercept[evaluated],
              "alpha": alpha_final[evaluated], "genes": np.array(genes)}
    if final.pca is not None:
        arrays.update(pca_components=final.pca.components_, pca_mean=final.pca.mean_)
    notes = []
    if len(genes) < kept.size:
        notes.append(f"{kept.size - len(genes)} of {kept.size} genes failed the training-fold filter in some fold "
                     "and are not evaluated")
    tables = {"metrics": metrics, "oof_predictions": oof_df}
    if p.permutations:  # per-gene r under permuted targets: the null the report draws
        tables["null"] = pd.DataFrame({"spearman_r": null})
    return FitResult(summary=summary, arrays=arrays, tables=tables, extraction_id=p.extraction_id, notes=notes)


def chunk_threads(g: int) -> int:
    """Gene chunks `fit genes` runs at once: one per core while each keeps >= ridge.THREAD_MIN_GENES genes."""
    from hefeat.learn import ridge, threads
    return threads.split_threads(g, ridge.THREAD_MIN_GENES)


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
        write_pred.table("slide_predictions", slide_df.reset_index())  # committed with the tile predictions
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
