"""The cross-validation of `fit genes` (hefeat.learn.emo) for one gene chunk at a time: each fold's ridge basis built
once, the chunk's training sums shared by its folds, final fit and permuted CVs, out-of-fold predictions written into
the fit's gene-major array."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hefeat.learn.data import SlideLevelData
from hefeat.store.catalog import Store

if TYPE_CHECKING:  # pragma: no cover
    from hefeat.learn.emo import GenesParams


def order_key(perm: np.ndarray | None):
    """The key of a row order in a chunk's X'Y cache: by content (an id() can be reused by a later array)."""
    return None if perm is None else perm.tobytes()


def shift_all(Y: np.ndarray, cohort: np.ndarray | None) -> np.ndarray:
    """Targets as pooled out-of-fold predictions are scored against: one median shift over all rows."""
    from hefeat.learn.data import median_shift

    return Y if cohort is None else median_shift(Y, cohort, np.arange(len(Y)))[0]


@dataclass
class Design:
    """A design's ridge basis (features PCA-reduced on its own rows when asked) and how it maps features."""

    basis: object
    pca: object | None

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        return X if self.pca is None else self.pca.transform(X)


def final_design(X: np.ndarray, p: GenesParams) -> Design:
    """The basis of the heads fitted on rows X (as RidgeHeads(alphas, pca, seed) fits them)."""
    from hefeat.learn.ridge import RidgeBasis

    X = np.asarray(X, np.float64)
    pca = None
    if p.pca:
        from sklearn.decomposition import PCA

        k = min(p.pca, X.shape[0] - 1, X.shape[1])
        pca = PCA(n_components=k, random_state=p.seed).fit(X)
        X = pca.transform(X)
    return Design(RidgeBasis(X, p.alphas), pca)


class GeneCV:
    """The CV of `fit genes` for one gene chunk at a time; each fold's decomposition is built once.

    Filters, median shifts and penalties use each fold's training part only. `cache` keeps each slide's
    tile features for the tile-level variant across folds, chunks and permutations.
    """

    def __init__(self, store: Store, params: GenesParams, data: SlideLevelData, folds, cohort):
        from hefeat.learn.splits import assert_disjoint

        self.store, self.p, self.data, self.folds, self.cohort = store, params, data, folds, cohort
        self.designs, self.X_test = [], []
        for f in folds:
            assert_disjoint(data.groups, f.train, f.test)
            d = final_design(data.X[f.train], params)
            self.designs.append(d)
            self.X_test.append(d.transform(data.X[f.test]))
        self.cache: dict = {}
        # Sums path (slide level, raw features, no per-fold median shift: every fold's design is rows of X and its
        # targets rows of the chunk): each fold's training variances and Xc'Yc come from whole-chunk sums minus its
        # test rows' (see `_fold_sums`), no gather of each fold's training rows for the filter and no n x r x genes
        # float64 product U'y per fit.
        self.sums = cohort is None and not params.pca and params.level == "slide"
        if self.sums:
            X = np.asarray(data.X, np.float64)
            self.Xg = X - X.mean(0)  # Xc_train'Yc_train does not change with a shift of X: this one keeps sums small
            self.xg_mean = self.Xg.mean(0)
            self.xg_train_mean = [self.Xg[f.train].mean(0) for f in folds]
            self.Xg_test = [self.Xg[f.test] for f in folds]
            # k-fold: the test rows partition the samples, so X'Y is the sum of the folds' test-row products
            self.partition = np.array_equal(np.sort(np.concatenate([f.test for f in folds])), np.arange(len(X)))
            self._chunk = None

    def begin_chunk(self, Yc: np.ndarray, y32: np.ndarray | None = None) -> GeneCV:
        """This CV for the gene chunk Yc (n, k): a shallow copy holding the chunk's state (chunks may run on threads
        at once). On the sums path, whole-chunk sums shared by its CV, its final fit and its permuted CVs (sums
        over all rows do not change under a permutation of the rows); X'Yc is made on first use per row order. `y32`: a
        (k, n) float32 buffer for the chunk's float32 copy (a new array if None)."""
        ch = copy.copy(self)
        if self.sums:
            from hefeat.learn.ridge import TrainingSums

            s1 = Yc.sum(0)
            ch._chunk = (Yc, s1, np.einsum("ij,ij->j", Yc, Yc), {})
            # float32 gene-major copy minus each gene's mean (a permutation does not change it): every fit of the
            # chunk gathers its training rows from it for the float32 residuals
            ch._y32 = TrainingSums.gene_major(Yc, s1 / len(Yc), y32)
        return ch

    def _xty(self, perm: np.ndarray | None) -> np.ndarray:
        """Xg'Y (p, k) of the chunk's targets in row order perm (Y = Yc[perm]: Σ_i x_i y_perm(i) = Xg[perm⁻¹]'Yc)."""
        Yc, _, _, xty = self._chunk
        key = order_key(perm)
        if key not in xty:
            Xg = self.Xg if perm is None else self.Xg[np.argsort(perm)]
            xty[key] = Xg.T @ Yc
        return xty[key]

    def final_xty(self, cols: np.ndarray) -> np.ndarray | None:
        """Xc'Yc (p, len(cols)) of every sample for the final fit (its design is all of X), or None (no sums path)."""
        if not self.sums:
            return None
        _, s1, _, _ = self._chunk
        n = len(self.Xg)
        return self._xty(None)[:, cols] - n * np.outer(self.xg_mean, s1[cols] / n)

    def _sums(self, mean: np.ndarray, y2: np.ndarray):
        """ridge.TrainingSums of a fit of the chunk: its training means and sums of squares, the chunk's float32 copy."""
        from hefeat.learn.ridge import TrainingSums

        Yc, s1, _, _ = self._chunk
        return TrainingSums(mean=mean, y2=y2, y32=self._y32, offset=s1 / len(Yc))

    def final_sums(self, cols: np.ndarray):
        """The training sums (ridge.TrainingSums) of the final fit (every sample) for the chunk's columns cols, or
        None (no sums path)."""
        if not self.sums:
            return None
        Yc, s1, s2, _ = self._chunk
        n = len(Yc)
        m = s1[cols] / n
        return self._sums(m, np.maximum(s2[cols] - n * m * m, 0))

    def _test_sums(self, perm: np.ndarray | None) -> list[tuple]:
        """Each fold's test-row sums of the chunk (rows in order perm): Σ y, Σ y² and Xg_t'Y_t (p, k). When the folds'
        test rows partition the samples, X'Y of that row order is their sum (cached for `_xty`): no n x p x k product
        of its own."""
        Yc, _, _, xty = self._chunk
        parts = []
        for i, f in enumerate(self.folds):
            Yt = Yc.T.take(f.test if perm is None else perm[f.test], axis=1).T  # the test rows, gathered per gene
            parts.append((Yt.sum(0), np.einsum("ij,ij->j", Yt, Yt), self.Xg_test[i].T @ Yt))
        key = order_key(perm)
        if self.partition and key not in xty:
            total = parts[0][2].copy()
            for part in parts[1:]:
                total += part[2]
            xty[key] = total
        return parts

    def _fold_sums(self, i: int, perm: np.ndarray | None, part: tuple):
        """Fold i's training variances (ddof 1) and Xc'Yc (p, k) of the chunk (rows in order perm) from the chunk's
        sums minus those of the fold's test rows (`part`, from `_test_sums`): var = (S2 - n_t ȳ_t²)/(n_t - 1),
        Xc'Yc = X'Y - n_t x̄_t ȳ_t'. Also a bound on the variance's rounding error (the raw sums cancel by ȳ²/var)."""
        _, s1, s2, _ = self._chunk
        n_t = len(self.folds[i].train)
        t1 = s1 - part[0]
        t2 = s2 - part[1]
        m = t1 / n_t
        var = (t2 - n_t * m * m) / (n_t - 1)
        err = 64 * np.finfo(np.float64).eps * (np.abs(t2) + n_t * m * m) / (n_t - 1)
        xty = self._xty(perm) - part[2] - n_t * np.outer(self.xg_train_mean[i], m)
        return var, err, xty, m

    def run(self, Yc: np.ndarray, perm: np.ndarray | None = None, out: np.ndarray | None = None,
            threads: int | None = None):
        """Out-of-fold predictions (n, k), per-fold kept genes (folds, k) and penalties (folds, k) of targets Yc
        (of Yc[perm] when perm is given: the sums path only, on the CV begin_chunk(Yc) returned). The predictions are
        written into `out` (n, k) when given (every element: NaN where no fold tested the row or a fold did not keep
        the gene). `threads`: each ridge fit's (RidgeBasis.fit)."""
        from hefeat.learn.data import median_shift, train_gene_filter
        from hefeat.learn.emo_tiles import tile_level_predict

        p, data = self.p, self.data
        n, k = Yc.shape
        oof = np.empty((n, k)) if out is None else out
        untested = np.ones(n, bool)
        for f in self.folds:
            untested[f.test] = False
        oof[untested] = np.nan  # the folds' test rows are written below, each fold all its row's columns
        kept = np.zeros((len(self.folds), k), bool)
        alphas = np.zeros((len(self.folds), k))
        parts = self._test_sums(perm) if self.sums else None
        for i, f in enumerate(self.folds):
            xty = sums = None
            if self.sums:
                var, err, xty, mean = self._fold_sums(i, perm, parts[i])
                train = f.train if perm is None else perm[f.train]
                keep = var > p.min_variance
                near = np.flatnonzero(np.abs(var - p.min_variance) <= err)
                if len(near):  # within rounding of the threshold: decided on the rows themselves as the row filter
                    # does (numpy sums a 2-column gather row after row, as it sums the whole chunk's rows)
                    two = np.r_[near, near[:1]]
                    keep[near] = Yc[np.ix_(train, two)].var(0, ddof=1)[:len(near)] > p.min_variance
                if p.median_positive:
                    keep &= np.median(Yc[train], 0) > 0
                Y, rows = Yc, train
            else:
                Y = Yc if self.cohort is None else median_shift(Yc, self.cohort, f.train)[0]
                keep = train_gene_filter(Y[f.train], min_variance=p.min_variance, median_positive=p.median_positive)
                rows = f.train
            kept[i] = keep
            if not keep.all():
                oof[np.ix_(f.test, np.flatnonzero(~keep))] = np.nan
            if not keep.any():
                continue
            cols = np.flatnonzero(keep)
            if self.sums:
                sums = self._sums(mean[cols], (len(f.train) - 1) * var[cols])
            heads = self.designs[i].basis.fit(Y, rows=rows, cols=cols,  # Y's rows/genes read in chunks
                                              xty=None if xty is None else xty[:, cols], sums=sums, threads=threads)
            alphas[i, cols] = heads.alpha
            if p.level == "slide":
                pred = heads.predict(self.X_test[i])
            else:
                pred = tile_level_predict(self.store, p.extraction_id, data, f.train, f.test, keep, heads.alpha, Y,
                                          self.cache)
            put_rows(oof, f.test, None if len(cols) == k else cols, pred)
        return oof, kept, alphas


def put_rows(out: np.ndarray, rows: np.ndarray, cols: np.ndarray | None, values: np.ndarray) -> None:
    """out[rows, cols] = values (cols None: every column). A gene-major (Fortran-ordered) `out` is written gene by
    gene down its contiguous columns: numpy's row scatter would cross every gene's column for each row."""
    if out.flags.f_contiguous and not out.flags.c_contiguous:
        for j, c in enumerate(range(out.shape[1]) if cols is None else cols):
            out[rows, c] = values[:, j]
    else:
        out[rows if cols is None else np.ix_(rows, cols)] = values  # whole rows: a row scatter, not a 2-d one
