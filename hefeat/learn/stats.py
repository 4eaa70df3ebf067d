"""Statistics shared by every method: per-gene correlations, errors, corrections, nulls, CIs.

A prediction "works" only if it correlates positively with the measurement, so p-values for
correlations are one-sided (r > 0) by default: cross-validated predictions of a pure-noise target
correlate negatively with it, and a two-sided test would call those genes significant.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats as ss

from hefeat.learn.threads import available_cores, thread_map

CORRECTIONS = {"bh": "fdr_bh", "bonferroni": "bonferroni", "holm": "holm", "holm-sidak": "holm-sidak"}


TRANSPOSE_BLOCK = 128  # rows and columns per tile of transposed_copy: a 128 x 128 float64 tile pair stays in L2


def transposed_copy(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of a.T (a 2-d), copied tile by tile (into `out` (g, n) when given). numpy's own transposing
    copy walks one side with a large stride: measured 449 ms for a 10,000 x 1,677 float64 chunk (np.asfortranarray)
    and 32 ms for an 8,968 x 256 block of ranks against 59 ms and ~3 ms tiled; the values are the same."""
    n, g = a.shape
    out = np.empty((g, n), a.dtype) if out is None else out
    b = TRANSPOSE_BLOCK
    for j in range(0, g, b):
        for i in range(0, n, b):
            out[j:j + b, i:i + b] = a[i:i + b, j:j + b].T
    return out


_POS_INF_KEY = np.uint32(0xFF800000)  # `_sort_keys`' high half of +inf; a positive NaN's lies above it
_NEG_INF_KEY = np.uint32(0x007FFFFF)  # ... of -inf; a negative NaN's lies below it


def _sort_keys(a: np.ndarray) -> np.ndarray:
    """(g, n) uint64 sort keys of a (n, g) float64, one gene per row: the value rounded to float32 and mapped to an
    unsigned int of the same order in the high 32 bits, the row position in the low 32 bits. Sorting the keys sorts
    each gene's values by their float32 rounding (monotone: x < y gives f32(x) <= f32(y)) and yields the positions
    with them; values that share a float32 are put in order by `_ranks_by_gene`. -0.0 is keyed as +0.0 (they are equal)."""
    n, g = a.shape
    f = np.empty((g, n), np.float32)
    b = TRANSPOSE_BLOCK
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for j in range(0, g, b):
            for i in range(0, n, b):
                f[j:j + b, i:i + b] = a[i:i + b, j:j + b].T
    f += np.float32(0)
    u = f.view(np.uint32)
    flip = u >> np.uint32(31)
    np.subtract(np.uint32(0), flip, out=flip)
    flip |= np.uint32(0x80000000)
    u ^= flip  # negatives reversed below the positives
    key = np.empty((g, n), np.uint64)
    halves = key.view(np.uint32).reshape(g, n, 2)  # little-endian: [..., 0] the low half, [..., 1] the high half
    halves[..., 0] = np.arange(n, dtype=np.uint32)
    halves[..., 1] = u
    return key


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) down each column, ties averaged, a column with NaN all NaN (scipy's rankdata
    semantics). See `_ranks_by_gene`."""
    a = np.asarray(a, float)
    if a.ndim == 1:
        return _rank(a[:, None])[:, 0]
    return _ranks_by_gene(a).T


def _ranks_by_gene(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`_rank` of a (n, g) float64, one gene per row (g, n), C-ordered (written into `out` when given). One sort
    per gene of 64-bit keys (`_sort_keys`: float32 value, position) instead of a float64 argsort and a gather of the
    sorted values: values whose float32 roundings are equal (a tie, or distinct float64 values one float32 apart) are
    few and are ordered and compared in float64 afterwards, so the ranks are exact; ties get the mean of their run's
    first and last position there, the other values their position. The ranks are scattered row by row (a gene's
    positions index one contiguous row: 2.7x faster than np.put_along_axis's broadcast index over the block)."""
    n, g = a.shape
    out = np.empty((g, n)) if out is None else out
    if n == 0 or g == 0:
        return out
    if n >= 1 << 32 or np.little_endian is False:  # positions must fit the keys' low half
        out[...] = _rank_argsort(a).T
        return out
    key = _sort_keys(a)
    key.sort(axis=1)
    halves = key.view(np.uint32).reshape(g, n, 2)
    order = halves[..., 0]
    hi = halves[..., 1]
    same = hi[:, 1:] == hi[:, :-1]  # neighbours with one float32: a tie, or float64 values to put in order
    nan = (hi[:, 0] < _NEG_INF_KEY) | (hi[:, -1] > _POS_INF_KEY)  # a NaN (either sign) sorts beyond the infinities
    ranks = None
    linked = np.flatnonzero(same)  # (gene, position) pairs linked to the next position, flat in (g, n - 1)
    if len(linked):
        order = order.reshape(-1).copy()  # flat (g·n): positions below are flat
        r, k = np.divmod(linked, n - 1)
        link = r * n + k  # the same pairs' first position, flat in (g, n)
        second = np.zeros(g * n, bool)
        second[link + 1] = True  # linked to the position before it
        mark = second.copy()
        mark[link] = True
        at = np.flatnonzero(mark)  # every position in a run of equal float32 keys, by gene then position
        del mark
        first = ~second[at]  # a run's first position
        del second
        run = np.cumsum(first) - 1
        vals = a[order[at], at // n]
        differs = vals != vals[np.flatnonzero(first)][run]
        if differs.any():  # runs of distinct float64 values (one float32): put those runs in float64 order
            bad = np.zeros(run[-1] + 1, bool)
            bad[run[differs]] = True
            sub = np.flatnonzero(bad[run])
            o = sub[np.lexsort((vals[sub], run[sub]))]
            order[at[sub]] = order[at[o]]
            vals[sub] = vals[o]
        new = first  # where a group of equal float64 values begins
        new[1:] |= vals[1:] != vals[:-1]
        if not new.all():  # ties: each group gets the mean of its first and last position
            starts = np.flatnonzero(new)
            ends = np.r_[starts[1:] - 1, len(new) - 1]
            gid = np.cumsum(new) - 1
            kk = at % n
            ranks = np.broadcast_to(np.arange(1, n + 1, dtype=float), (g, n)).copy()
            ranks.reshape(-1)[at] = (kk[starts][gid] + kk[ends][gid]) / 2 + 1
        order = order.reshape(g, n)
    del key
    pos = np.arange(1, n + 1, dtype=float)
    for j in range(g):
        out[j][order[j].astype(np.intp)] = pos if ranks is None else ranks[j]
    out[nan] = np.nan
    return out


def _spearman_ranked(rp: np.ndarray, rt: np.ndarray) -> np.ndarray:
    """Spearman r per row of the average ranks rp, rt (g, n) (`_ranks_by_gene`). Average ranks always sum to
    n(n + 1)/2, so with m = (n + 1)/2 the centred sums are Σ rp·rt - n·m² and Σ r² - n·m²: ranks are multiples of
    1/2, so below n = 2^17 each sum is exact in float64 and only the final quotient rounds (no centred copies)."""
    n = rp.shape[1]
    nm2 = n * ((n + 1) / 2) ** 2
    spp = np.einsum("ij,ij->i", rp, rp) - nm2
    stt = np.einsum("ij,ij->i", rt, rt) - nm2
    den = np.sqrt(spp * stt)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (np.einsum("ij,ij->i", rp, rt) - nm2) / den
    return np.where(den > 0, r, np.nan)


def _spearman(pred: np.ndarray, true: np.ndarray | None, rt: np.ndarray | None = None) -> np.ndarray:
    """Spearman r per column of pred and true (n, g): Pearson r of their average ranks (true's given as rt (g, n))."""
    return _spearman_ranked(_ranks_by_gene(np.asarray(pred, float)),
                            _ranks_by_gene(np.asarray(true, float)) if rt is None else rt)


def _tie_ranks(start: np.ndarray) -> np.ndarray:
    """Average ranks by sorted position of rows whose runs of equal values begin where `start` (m, n) is True."""
    n = start.shape[1]
    pos = np.arange(n, dtype=np.int64)
    end = np.ones(start.shape, bool)
    end[:, :-1] = start[:, 1:]
    first = np.maximum.accumulate(np.where(start, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(end, pos, n)[:, ::-1], axis=1)[:, ::-1]
    return (first + last) / 2 + 1


def _rank_argsort(a: np.ndarray) -> np.ndarray:
    """`_rank` by one float64 argsort per gene (the reference the key sort is tested against)."""
    n = a.shape[0]
    t = transposed_copy(a)  # one gene per contiguous row: the sorts run on contiguous memory
    order = np.argsort(t, axis=1)
    v = np.take_along_axis(t, order, 1)
    start = np.ones(v.shape, bool)
    np.not_equal(v[:, 1:], v[:, :-1], out=start[:, 1:])
    ranks = np.broadcast_to(np.arange(1, n + 1, dtype=float), v.shape)
    if not start.all():
        ranks = _tie_ranks(start)
    out = np.empty(t.shape)
    np.put_along_axis(out, order, ranks, 1)
    out[np.isnan(t).any(1)] = np.nan
    return out.T


COLUMN_BLOCK = 256  # genes per block of the column-wise statistics: temporaries stay (n, block), not (n, g)
COLUMN_THREADS = min(8, available_cores())  # threads for the blocks (they release the GIL)


def _by_columns(fn, pred: np.ndarray, true: np.ndarray | None, cols: np.ndarray | None = None,
                ranks: np.ndarray | None = None) -> np.ndarray:
    """fn(pred block, true block) over blocks of COLUMN_BLOCK columns (of `cols` only, if given), concatenated on the
    last axis; with `ranks` (g, n), fn(pred block, true block, the block's rows of ranks). Blocks run on COLUMN_THREADS
    threads: sorting, gathers and reductions release the GIL, and each block is computed exactly as alone, so the
    result does not depend on the thread count."""
    pred, true = np.asarray(pred), None if true is None else np.asarray(true)

    def call(c) -> np.ndarray:
        args = (pred[:, c], None if true is None else true[:, c])
        return fn(*args) if ranks is None else fn(*args, ranks[c])

    if cols is None:
        if pred.ndim < 2 or pred.shape[1] <= COLUMN_BLOCK:
            return fn(pred, true) if ranks is None else fn(pred, true, ranks)
        blocks = [slice(j, j + COLUMN_BLOCK) for j in range(0, pred.shape[1], COLUMN_BLOCK)]
    else:
        cols = np.asarray(cols)
        if len(cols) == 0:
            return np.zeros(0)
        blocks = [cols[j:j + COLUMN_BLOCK] for j in range(0, len(cols), COLUMN_BLOCK)]

    return np.concatenate(thread_map(call, blocks, COLUMN_THREADS), axis=-1)


def _pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    den = np.sqrt(np.einsum("ij,ij->j", p, p) * np.einsum("ij,ij->j", t, t))  # no (n, g) product temporaries
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->j", p, t) / den
    return np.where(den > 0, r, np.nan)


def columnwise_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column of pred (n, g) with the same column of true (n, g); NaN if constant."""
    return _by_columns(_pearson, pred, true)


def columnwise_spearman(pred: np.ndarray, true: np.ndarray | None, cols: np.ndarray | None = None, *,
                        true_ranks: np.ndarray | None = None) -> np.ndarray:
    """Spearman rho per column (Pearson on average ranks), in blocks of genes; `cols`: only these columns
    (without copying them out of pred and true first). `true_ranks`: true's ranks from `gene_ranks` (true unused)."""
    if true_ranks is not None and cols is not None:
        raise ValueError("true_ranks are given for every column: no cols with them")
    return _by_columns(_spearman, pred, true, cols, true_ranks)


def gene_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (g, n) of each column of a (n, g), one gene per row (scipy rankdata's, a column with NaN all NaN),
    in blocks of genes on threads: a truth ranked once for several predictions (`true_ranks` of the metrics)."""
    a = np.asarray(a)
    n, g = a.shape
    out = np.empty((g, n))
    thread_map(lambda j: _ranks_by_gene(np.asarray(a[:, j:j + COLUMN_BLOCK], float), out[j:j + COLUMN_BLOCK]),
               list(range(0, g, COLUMN_BLOCK)), COLUMN_THREADS)
    return out


def r_pvalue(r: np.ndarray, n: int, alternative: str = "greater") -> np.ndarray:
    """p-value of correlation r over n pairs (t-test with n - 2 dof); one-sided 'greater' by default."""
    r = np.clip(np.asarray(r, float), -0.9999999, 0.9999999)
    t = r * np.sqrt((n - 2) / (1 - r**2))
    if alternative == "greater":
        p = ss.t.sf(t, n - 2)
    elif alternative == "less":
        p = ss.t.cdf(t, n - 2)
    elif alternative == "two-sided":
        p = 2 * ss.t.sf(np.abs(t), n - 2)
    else:
        raise ValueError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    return np.where(np.isnan(r), 1.0, p)


def correct(p: np.ndarray, method: str = "bh", alpha: float = 0.05) -> np.ndarray:
    """Adjusted p-values (statsmodels): bh, bonferroni, holm, holm-sidak."""
    from statsmodels.stats.multitest import multipletests

    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}")
    p = np.asarray(p, float)
    out = np.ones_like(p)
    ok = ~np.isnan(p)
    if ok.any():
        # Sidak steps compute log1p(-p): p = 1 gives -inf there (correctly adjusted to 1), not a user's problem
        with np.errstate(divide="ignore"):
            out[ok] = multipletests(p[ok], alpha=alpha, method=CORRECTIONS[method])[1]
    return out


def r2_score_cols(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column (1 - SSE/SST); can be negative."""
    e, c = true - pred, true - true.mean(0)
    sse, sst = np.einsum("ij,ij->j", e, e), np.einsum("ij,ij->j", c, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sst > 0, 1 - sse / sst, np.nan)


def rmse_cols(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Root mean squared error per column."""
    e = true - pred
    return np.sqrt(np.einsum("ij,ij->j", e, e) / len(e))


def _four(pred: np.ndarray, true: np.ndarray, rt: np.ndarray | None = None) -> np.ndarray:
    """Pearson r, Spearman r, R² and RMSE per column, each computed as `_pearson`, `r2_score_cols` and `rmse_cols`
    compute it (the same bits), with the terms they share made once: the centred targets and their sum of squares
    (Pearson's and R²'s), the residuals and their sum of squares (R²'s and RMSE's)."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    tt = np.einsum("ij,ij->j", t, t)
    den = np.sqrt(np.einsum("ij,ij->j", p, p) * tt)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->j", p, t) / den
    del p, t
    e = true - pred
    sse = np.einsum("ij,ij->j", e, e)
    del e
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(tt > 0, 1 - sse / tt, np.nan)
    return np.stack([np.where(den > 0, r, np.nan), _spearman(pred, true, rt), r2, np.sqrt(sse / len(pred))])


def gene_metric_columns(pred: np.ndarray, true: np.ndarray, *, true_ranks: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
    """Per-column Pearson r, Spearman r, R² and RMSE of pred (n, g) against true (n, g), in blocks of genes (each
    block's columns read once for all four); `true_ranks`: true's ranks (`gene_ranks`), when made already."""
    out = _by_columns(_four, pred, true, None, true_ranks)
    return dict(zip(("pearson_r", "spearman_r", "r2", "rmse"), out, strict=True))


def gene_metrics_table(columns: dict[str, np.ndarray], genes: list[str], n: int, *, split: str,
                       alternative: str = "greater") -> pd.DataFrame:
    """The per-gene metrics table from gene_metric_columns' arrays over n units: one-sided p, corrections."""
    pr, sr = columns["pearson_r"], columns["spearman_r"]
    df = pd.DataFrame({"gene": genes, "n": n, "pearson_r": pr, "spearman_r": sr,
                       "pearson_p": r_pvalue(pr, n, alternative), "spearman_p": r_pvalue(sr, n, alternative),
                       "r2": columns["r2"], "rmse": columns["rmse"]})
    for m in CORRECTIONS:
        df[f"spearman_p_{m.replace('-', '_')}"] = correct(df["spearman_p"].to_numpy(), m)
    df["pearson_p_bh"] = correct(df["pearson_p"].to_numpy(), "bh")
    df["split"] = split
    return df


def gene_metrics(pred: np.ndarray, true: np.ndarray, genes: list[str], *, split: str,
                 alternative: str = "greater") -> pd.DataFrame:
    """Per-gene Pearson/Spearman r with one-sided p, BH/Bonferroni/Holm/Holm–Šidák, R², RMSE."""
    return gene_metrics_table(gene_metric_columns(pred, true), genes, len(true), split=split, alternative=alternative)


def permutation_null(fit_predict: Callable[[np.ndarray], np.ndarray], Y: np.ndarray, *, n_perm: int = 1,
                     seed: int = 0) -> np.ndarray:
    """Spearman r of predictions refitted on targets permuted across samples; shape (n_perm, g)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_perm):
        Yp = Y[rng.permutation(len(Y))]
        out.append(columnwise_spearman(fit_predict(Yp), Yp))
    return np.asarray(out)


def empirical_p(r: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p-value of each r against a pooled null distribution of correlations: P(null >= r)."""
    pool = np.sort(np.asarray(null, float).ravel())
    pool = pool[~np.isnan(pool)]
    r = np.asarray(r, float)
    ge = len(pool) - np.searchsorted(pool, r, side="left")
    return np.where(np.isnan(r), np.nan, (ge + 1) / (len(pool) + 1))  # an undefined r has no p, not the smallest


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of stat(indices) over n samples (resampling groups if given)."""
    rng = np.random.default_rng(seed)
    vals = []
    if groups is not None:
        ug = np.unique(groups)
        members = {g: np.flatnonzero(groups == g) for g in ug}
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[g] for g in rng.choice(ug, len(ug))])
        v = stat(idx)
        if v is not None and np.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of score for the rows where `positive` is True against the others, as the Mann-Whitney U with average
    ranks for ties (equal to scikit-learn's roc_auc_score); None when one class is empty."""
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return None
    r = ss.rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_with_ci(y: np.ndarray, score: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                groups: np.ndarray | None = None, level: float = 0.95) -> dict:
    """ROC AUC with a percentile bootstrap CI (95 % by default); NaN when y has one class."""
    from sklearn.metrics import roc_auc_score

    y, score = np.asarray(y), np.asarray(score)
    if len(np.unique(y)) < 2:
        return {"auc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": len(y)}

    pos = y == np.unique(y)[-1]  # roc_auc_score's positive class for binary y: the larger label
    score_f = np.asarray(score, float)

    def stat(idx):  # the resamples skip scikit-learn's input checks (~1 ms a call, most of a 1,000-resample CI)
        return binary_auc(pos[idx], score_f[idx])

    lo, hi = bootstrap_ci(stat, len(y), n_boot=n_boot, seed=seed, groups=groups, level=level)
    return {"auc": float(roc_auc_score(y, score)), "ci_low": lo, "ci_high": hi, "n": int(len(y))}


def gene_set_score(r_by_gene: pd.Series, gene_set: list[str], *, n_random: int = 10_000, seed: int = 0) -> dict:
    """Mean r of a gene set vs the mean r of random gene lists of the same length (HE2RNA's check)."""
    r = r_by_gene.dropna()
    members = [g for g in gene_set if g in r.index]
    if not members:
        raise ValueError("none of the gene set's genes has a metric")
    obs = float(r[members].mean())
    rng = np.random.default_rng(seed)
    vals = r.to_numpy()
    rand = np.array([vals[rng.choice(len(vals), len(members), replace=False)].mean() for _ in range(n_random)])
    return {"n_genes": len(members), "mean_r": obs, "random_mean": float(rand.mean()),
            "p_value": float(((rand >= obs).sum() + 1) / (n_random + 1))}


def sign_test(n_positive: int, n: int) -> float:
    """One-sided binomial test P(X >= n_positive | n, p = 0.5) (ST-Net's per-gene test over patients)."""
    return float(ss.binomtest(n_positive, n, 0.5, alternative="greater").pvalue) if n else 1.0
