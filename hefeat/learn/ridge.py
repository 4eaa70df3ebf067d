"""Closed-form multi-target ridge with a per-target penalty chosen by efficient leave-one-out.

One decomposition of the centred design serves every gene and every candidate penalty: with
Xc = U S V' (from the eigendecomposition of the smaller Gram matrix, Xc'Xc or XcXc'), the hat matrix
for penalty a is 11'/n + U diag(d) U' with d = s²/(s²+a), and the leave-one-out residual of sample i
is r_i / (1 - h_i) (Allen 1974; Golub, Heath & Wahba 1979). The intercept is unpenalised, as in
scikit-learn's RidgeCV, whose `alpha_per_target=True` path this reproduces.

At transcriptome scale (20,000 genes x 10,000 samples) the n x g residual matrix is never formed per
penalty. With c = U'y, the least-squares residual q = y - U c, e = 1 - d = a/(s²+a) and the shrunk part
ρ = U(e∘c), the residual is r = q + ρ, and with the LOO weights w = 1/(1-h)²

    n·MSE(a) = Σ w q²  +  ρ' diag(w) ρ  +  2 Σ w q ρ.

The first term is one GEMM of (q∘q)' with the n x A weight matrix; the second is |L_a'(e∘c)|² with L_a the
Cholesky factor of U' diag(w_a) U (w >= 1, well conditioned): one triangular product per penalty. Only the
cross term needs an n x r x genes product per penalty. It is bounded first, exactly and cheaply: q is
orthogonal to U (U'q = 0), so Σ q ρ = 0 and, for the centred weights δ = w - mean(w),

    Σ w q ρ = Σ δ q ρ,   |Σ δ q ρ| <= sqrt(Σ |δ| q²) · sqrt((e∘c)' U' diag(|δ|) U (e∘c))      (Cauchy-Schwarz)

(the first factor is the same GEMM as Σ w q², the second one more triangular product per penalty with the
Cholesky factor of U' diag(|δ|) U). So every penalty's score lies in [T - B, T + B] with T = Σ w q² + ρ'diag(w)ρ
and B = 2·(that product). A penalty whose lower end lies above the smallest upper end (plus TIE_TOL, the
float32 margin) cannot be the gene's LOO-best; only the others get their cross term computed exactly, as
(e∘c)·((U∘δ)'q) for the genes where that penalty is a candidate, in two rounds: each gene's most likely
penalty first, then the candidates whose lower end still reaches that exact score (1.6 per gene of 15 on
the fabricated store's features, where δ spans ~0.08; 2.1 in one round). The best penalty always is one,
so every gene's reported LOO MSE is exact. No weight approximation is involved: the chosen penalties are
those of the exact scores.

Genes stream in chunks sized to memory. The big GEMMs run in float32; the decomposition, c and the final
coefficients are float64, and genes whose best two penalties are within float32 error of each other are
re-scored exactly in float64, so the chosen penalties are the float64 ones. Penalties whose LOO weights
explode (leverage > 1/2) and dtype=float64 fits are scored from their float64 residuals. A fit with few
targets skips the per-basis set-up (two r x r factors per penalty) and scores each penalty's residuals
directly (float32 GEMMs where the weights are tame, near ties re-scored in float64 as on the GEMM path).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas
from sklearn.base import BaseEstimator, RegressorMixin

from hefeat.errors import HefeatError
from hefeat.learn.threads import single_blas_thread, split_threads, thread_map

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
MEMORY_BYTES = 1 << 30  # working memory of the gene chunks (the design and its decomposition come on top)
TIE_TOL = 5e-6  # relative MSE gap below which float32 scores are re-checked in float64 (measured float32 score
# error, scaled as here: <= 2.03e-7 at 8,000 samples on the fabricated 10,000-slide store, every float32 score of 3,000
# genes in all 11 fits of fit genes, observed and permuted, so two scores' gap is off by <= 4.1e-7, 12x below this;
# 2e-5 re-scored 3.4 % of the (gene, fit) pairs there, 5e-6 0.83 %, with the same penalties)
SQUARE_BLOCK = 64  # genes per block of squared residuals (64 x 8,000 float32: 2 MB, one core's L2)
THREAD_MIN_GENES = 256  # genes per chunk below which a fit does not split its genes over threads
MAX_WEIGHT_F32 = 4.0  # LOO weights 1/(1-h)² above this (leverage > 1/2) are scored in float64
_TRMM = {"f": blas.strmm, "d": blas.dtrmm}


@dataclass(frozen=True)
class RidgeFit:
    """Fitted heads: coef (p, g), intercept (g,), alpha (g,), loo_mse (g,)."""

    coef: np.ndarray
    intercept: np.ndarray
    alpha: np.ndarray
    loo_mse: np.ndarray

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions (n, g) for features X (n, p)."""
        return X @ self.coef + self.intercept


SMALL_LAPACK = 512  # matrices up to this order are factorised on one BLAS thread (_one_blas_thread)


def _one_blas_thread(order: int):
    """LAPACK factorisations of small matrices (eigh of a 256 x 256 Gram, 15 Cholesky factors of 256 x 256) on one
    BLAS thread: OpenBLAS's threaded potrf/syevd synchronise between many small steps, and with the other core
    busy (another process, or a spinning BLAS thread) they wait there: measured 0.6-8.5 s per basis set-up at load
    6 on 2 cores (3.9 s per batch of 15 Cholesky factors) against 0.5-0.7 s single-threaded. Larger ones keep the
    threads (at 1,024-d the single-threaded eigh and factors cost ~3 s per fit on the quiet machine)."""
    if order > SMALL_LAPACK:
        return contextlib.nullcontext()
    return single_blas_thread()


def _decompose(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (n, r), s (r,), V (p, r) of the centred design from the smaller Gram matrix (float64), rank-truncated."""
    n, p = Xc.shape
    G = Xc.T @ Xc if n >= p else Xc @ Xc.T
    with _one_blas_thread(G.shape[0]):
        s2, W = np.linalg.eigh(G)  # W: V's columns when n >= p, else U's
    top = s2.max() if len(s2) else 0.0
    keep = s2 > top * max(n, p) * np.finfo(np.float64).eps if top > 0 else np.zeros(len(s2), bool)
    s2 = s2[keep][::-1]
    s = np.sqrt(s2)
    W = W[:, keep][:, ::-1]
    if n >= p:
        V, U = W, (Xc @ W) / s
    else:
        U, V = W, (Xc.T @ W) / s
    return U, s, V


def _chunk(n: int, r: int, A: int, g: int, memory: int) -> int:
    per_gene = 8 * n + 4 * n * 3 + 4 * r * 4 + 8 * A * 6  # float64 y; float32 q (genes by rows), q², U c; scores
    return int(max(1, min(g, memory // per_gene)))


def _cholesky_t(M: np.ndarray, dt, jitter: float = 0.0) -> np.ndarray:
    """Transposed lower Cholesky factors (Fortran-ordered lower factors for BLAS trmm) of the symmetric positive
    (semi)definite matrices M (..., r, r), in dtype dt. `jitter` (relative to the largest diagonal entry) keeps
    semidefinite ones factorable; it only enlarges the quadratic forms (used for the bounds, never the scores)."""
    M = (M + np.swapaxes(M, -1, -2)) / 2
    r = M.shape[-1]
    if jitter:
        M = M + (jitter * np.abs(np.diagonal(M, axis1=-2, axis2=-1)).max(-1) + 1e-300)[..., None, None] * np.eye(r)
    with _one_blas_thread(r):
        L = np.linalg.cholesky(M)
    return np.swapaxes(L, -1, -2).astype(dt)


def _take(Y: np.ndarray, rows: np.ndarray | None, cols) -> np.ndarray:
    """A float64 copy of Y[rows][:, cols] (the caller centres it in place), copied once; gene-major (Fortran-ordered)
    when Y is, which the float32 scoring path reads fastest."""
    if rows is not None and isinstance(cols, slice) and Y.flags.f_contiguous:
        sub = Y[:, cols].T.take(rows, axis=1).T  # each gene's rows gathered from its contiguous column
        return sub if sub.dtype == np.float64 else sub.astype(np.float64)
    sub = Y[:, cols] if rows is None else Y[rows, cols] if isinstance(cols, slice) else Y[np.ix_(rows, cols)]
    if sub.dtype == np.float64 and not np.shares_memory(sub, Y):
        return sub
    return sub.astype(np.float64)


def _loo_mse_exact(U: np.ndarray, s2: np.ndarray, h: np.ndarray, a: float, Yc: np.ndarray,
                   C: np.ndarray) -> np.ndarray:
    """Float64 LOO MSE of each column of Yc at penalty a, from the direct residuals."""
    loo = (Yc - U @ (s2 / (s2 + a) * C)) / (1.0 - h)[:, None]
    return (loo * loo).mean(0)


class RidgeBasis:
    """Everything about one design X that every target shares: its decomposition, the leverages and LOO weights
    of every candidate penalty and the factors the scores and their bounds need. Build once per design (a CV
    fold), then `fit` any number of target matrices or gene chunks against it.

    `pairs_scored` / `genes_scored` count the (penalty, gene) cross terms computed exactly on the GEMM path (the
    rest were excluded by the bounds, see the module docstring) and the genes fitted there.
    """

    def __init__(self, X: np.ndarray, alphas=DEFAULT_ALPHAS, dtype=np.float32):
        X = np.asarray(X, np.float64)
        if not np.isfinite(X).all():
            raise HefeatError("ridge inputs contain NaN or inf; drop or impute those samples/genes first")
        if X.shape[0] < 3:
            raise HefeatError(f"ridge needs >= 3 samples with matching X and Y rows (got X {X.shape})")
        alphas = np.asarray(sorted(float(a) for a in alphas), np.float64)
        if len(alphas) == 0 or (alphas <= 0).any():
            raise HefeatError("ridge penalties must be > 0")
        n = X.shape[0]
        self.n, self.p, self.alphas = n, X.shape[1], alphas
        self.x_mean = X.mean(0)
        self.U, self.s, self.V = _decompose(X - self.x_mean)
        U = self.U
        self.s2 = s2 = self.s * self.s
        D = s2[:, None] / (s2[:, None] + alphas[None, :])  # (r, A) shrinkage of each component
        self.E = alphas[None, :] / (s2[:, None] + alphas[None, :])  # 1 - D without the cancellation
        self.h_all = 1.0 / n + (U * U) @ D  # (n, A) leverages
        self.w_all = w_all = 1.0 / (1.0 - self.h_all) ** 2  # (n, A) LOO weights
        # float32 where the weights are tame (no leverage near 1: the terms of the sum cannot cancel much);
        # penalties whose LOO weights explode (n near the rank, small penalties) are scored in float64.
        f32 = np.flatnonzero(w_all.max(0) <= MAX_WEIGHT_F32) if np.dtype(dtype) == np.float32 else np.arange(0)
        self.f32, self.f64 = f32, np.setdiff1d(np.arange(len(alphas)), f32)
        self._parts = None
        self._U32 = None  # U in float32 for the direct scores (few genes), made on first use
        self._U1 = None  # [U | 1] in float32, made on first use (`_u_ones`)
        self._ud = {}  # U∘δ_a per float32 penalty index, made on first use (`_u_dev`)
        self.rank = len(self.s)
        self.pairs_scored = self.genes_scored = 0
        self._lock = threading.RLock()

    @property
    def parts(self) -> tuple | None:
        """For the float32 penalties (None without any): their indices, U (float32), δ (n, |idx|) with δ_a = w_a -
        mean(w_a) (float32), [w | |δ|] (n, 2|idx|), E' (|idx|, r), and the transposed Cholesky factors of
        U' diag(w_a) U and of U' diag(|δ_a|) U (|idx|, r, r; `[i].T` is the lower factor in Fortran order for
        BLAS trmm). Built once, on the first fit with many genes."""
        with self._lock:  # fits of gene chunks on threads share the basis
            if self._parts is None and len(self.f32):
                self._parts = self._make_parts()
        return self._parts

    def _make_parts(self) -> tuple:
        """The tuple `parts` describes (made once)."""
        idx = self.f32
        U32 = self.U.astype(np.float32)
        n, r, A = self.n, self.rank, len(idx)
        W = self.w_all[:, idx]
        dev = W - W.mean(0)
        dev32, adev32 = dev.astype(np.float32), np.abs(dev).astype(np.float32)
        # U' diag(w_a) U = U' diag(δ_a) U + mean(w_a) I (U'U = I), and U' diag(|δ_a|) U for the bound: one n x r
        # buffer reused per penalty (no n x A x r array)
        Mw, Md = np.empty((A, r, r)), np.empty((A, r, r))
        buf = np.empty((n, r), np.float32)
        for i in range(A):
            Mw[i] = np.multiply(U32, dev32[:, i:i + 1], out=buf).T @ U32
            Md[i] = np.multiply(U32, adev32[:, i:i + 1], out=buf).T @ U32
        Mw += W.mean(0)[:, None, None] * np.eye(r)
        WB = np.concatenate([W, np.abs(dev)], axis=1).astype(np.float32)
        self._w_mean, self._dev_max = W.mean(0), np.abs(dev).max(0) * (1 + 1e-6)  # float32 rounding of δ
        return (idx, U32, dev32, WB, np.ascontiguousarray(self.E.T[idx], np.float32),
                _cholesky_t(Mw, np.float32), _cholesky_t(Md, np.float32, jitter=1e-6))

    def _u_dev(self, i: int) -> np.ndarray:
        """U∘δ_a (n, r) float32 of the i-th float32 penalty, made on the first fit that has a candidate there."""
        with self._lock:  # gene chunks run on threads
            if i not in self._ud:
                _, U32, dev32, *_ = self.parts
                self._ud[i] = U32 * dev32[:, i:i + 1]
            return self._ud[i]

    def _score_direct(self, Yj: np.ndarray, C: np.ndarray) -> np.ndarray:
        """LOO MSE (A, k) from each penalty's residuals: cheaper than the GEMM path's set-up for few genes. The
        float32 penalties' residuals come from float32 GEMMs (their near ties are re-scored in float64 by `fit`),
        the others' in float64; the weighted sums over samples are float64."""
        Q = Yj - self.U @ C
        mse = np.empty((len(self.alphas), Yj.shape[1]))
        if len(self.f32):
            if self._U32 is None:
                self._U32 = self.U.astype(np.float32)
            Q32, C32 = Q.astype(np.float32), C.astype(np.float32)
        for a in range(len(self.alphas)):
            f32 = a in self.f32
            R = (self._U32 @ (self.E[:, [a]].astype(np.float32) * C32)) if f32 else self.U @ (self.E[:, [a]] * C)
            R += Q32 if f32 else Q
            R *= R
            mse[a] = (self.w_all[:, a] @ R) / self.n
        return mse

    def _slack(self, hi: np.ndarray, y2: np.ndarray) -> np.ndarray:
        """The float32 margin (n·MSE units) within which a penalty's lower end still counts as reaching `hi`."""
        m1 = hi / self.n
        return self.n * TIE_TOL * (m1 + np.sqrt(np.maximum(m1, 0) * y2 / self.n))

    def _bracket(self, Qt: np.ndarray, C: np.ndarray, shift: np.ndarray | None = None, y2: np.ndarray | None = None):
        """For targets Qt (k, n) float32, gene by row, overwritten in place by their residual, and C = U'y (r, k) of the
        centred targets y = Qt - shift (shift (k,): the training mean minus what was already subtracted; None: 0):
        the float32 residual q = y - U c (k, n; Qt itself), c (float32), and per float32 penalty T = Σ w q² +
        ρ'diag(w)ρ and the bound B on the cross term (|idx|, k): n·MSE lies in [T - B, T + B].

        With y2 (the targets' Σ (y - mean)², for the margin), the two r x r forms are computed only where they can
        matter: first every penalty gets the cheap interval from |U'diag(δ)U| <= max|δ| (U'U = I), i.e.
        ρ'diag(δ)ρ and ρ'diag(|δ|)ρ within max|δ_a|·|e∘c|²; a penalty whose cheap lower end lies above the smallest
        cheap upper end cannot be the best, and keeps that (valid) cheap interval. On the fabricated store this
        skips the forms for ~2/3 of the (penalty, gene) pairs."""
        idx, U32, _, WB, Et, LT, LD = self.parts
        A, k = len(idx), Qt.shape[0]
        Cd = C.astype(np.float32)
        # q = y - U c in one GEMM on Qt's memory (Qt.T is the Fortran-ordered n x k matrix BLAS overwrites); the
        # training mean rides along as one more column of ones in U and one more row of C
        Ua, Ca = (U32, Cd) if shift is None else (self._u_ones(), np.vstack([Cd, shift.astype(np.float32)[None]]))
        blas.sgemm(-1.0, Ua.T, Ca.T, beta=1.0, c=Qt.T, trans_a=1, trans_b=1, overwrite_c=1)
        # Σ w q² and Σ |δ| q² (k, 2A), genes in blocks: the squares stay in cache instead of a k x n temporary
        TB = np.empty((k, WB.shape[1]), np.float32)
        sq = np.empty((min(k, SQUARE_BLOCK), Qt.shape[1]), np.float32)
        for j in range(0, k, SQUARE_BLOCK):
            b = np.square(Qt[j:j + SQUARE_BLOCK], out=sq[:min(SQUARE_BLOCK, k - j)])
            np.matmul(b, WB, out=TB[j:j + SQUARE_BLOCK])
        est = TB[:, :A].T.astype(np.float64)
        bnd = np.sqrt(np.maximum(TB[:, A:].T, 0).astype(np.float64))
        live = np.ones((A, k), bool)
        if y2 is not None:  # cheap intervals first (docstring)
            ec2 = (Et.astype(np.float64) ** 2) @ (Cd.astype(np.float64) ** 2)  # |e_a∘c|² (A, k)
            mid = est + self._w_mean[:, None] * ec2
            half = self._dev_max[:, None] * ec2 + 2 * bnd * np.sqrt(self._dev_max[:, None] * ec2)
            top = (mid + half).min(0)
            live = mid - half <= top + self._slack(top, y2)
            est, bnd = np.where(live, est, mid), np.where(live, bnd, half)
        trmm = _TRMM["f"]
        for i in range(A):
            sel = np.flatnonzero(live[i])
            if not len(sel):
                continue
            # (k', r) shrunk part of the residual, e∘c, of the live genes (Fortran-ordered for trmm)
            EC = (Et[i][:, None] * (Cd if len(sel) == k else Cd[:, sel])).T
            # ρ' diag(w) ρ = |L_a'(e∘c)|² with L_a L_a' = U' diag(w_a) U: one trmm; the bound's form likewise
            T = trmm(1.0, LT[i].T, EC, side=1, lower=1)
            est[i, sel] += np.einsum("kr,kr->k", T, T, dtype=np.float64)
            T = trmm(1.0, LD[i].T, EC, side=1, lower=1, overwrite_b=1)
            bnd[i, sel] *= 2 * np.sqrt(np.einsum("kr,kr->k", T, T, dtype=np.float64))
        return Qt, Cd, est, bnd

    def _u_ones(self) -> np.ndarray:
        """[U | 1] (n, r + 1) float32, for residuals that also remove a mean."""
        with self._lock:
            if self._U1 is None:
                self._U1 = np.hstack([self.parts[1], np.ones((self.n, 1), np.float32)])
            return self._U1

    def _score_bounded(self, Qt: np.ndarray, C: np.ndarray, y2: np.ndarray, mse: np.ndarray,
                       shift: np.ndarray | None = None) -> tuple[int, int]:
        """mse[f32] (|idx|, k): exact float32 scores of every penalty the bounds leave as a candidate, inf for the
        others (module docstring); returns (cross terms computed, genes). Qt, C, shift: as `_bracket` takes them (Qt
        is overwritten)."""
        idx, _, _, _, Et, _, _ = self.parts
        n, k, A = self.n, Qt.shape[0], len(idx)
        Qt, Cd, est, bnd = self._bracket(Qt, C, shift, y2)
        hi = (est + bnd).min(0)
        cand = est - bnd <= hi + self._slack(hi, y2)  # the best penalty is always one
        out = np.full((A, k), np.inf)
        # Two rounds: each gene's most likely penalty (the middle of its interval lowest) first, then only the
        # candidates whose lower end still reaches that exact score. The best penalty's score is at most any score, so
        # it stays a candidate; a penalty dropped here scores above the first by more than the float32 margin, so the
        # near-tie re-scoring in `_fit_block` meets the same penalties. About half the other candidates go.
        def score(todo: np.ndarray) -> int:
            """Exact scores of the (penalty, gene) pairs in `todo` into `out`; returns how many."""
            for i in range(A):
                sel = np.flatnonzero(todo[i])
                if not len(sel):
                    continue
                # (U∘δ_a)'q for the genes where penalty a is a candidate only: gathering their rows of q costs a copy
                # of them, far less than the GEMM over the others
                UDi = self._u_dev(i)
                Z = Qt @ UDi if len(sel) == k else Qt[sel] @ UDi
                cross = np.einsum("kr,rk->k", Z, Et[i][:, None] * Cd[:, sel], dtype=np.float64)
                out[i, sel] = est[i, sel] + 2 * cross
            return int(todo.sum())

        first = np.zeros((A, k), bool)
        first[np.where(cand, est, np.inf).argmin(0), np.arange(k)] = True
        scored = score(first)
        top = out.min(0)
        scored += score(cand & ~first & (est - bnd <= top + self._slack(top, y2)))
        mse[idx] = out / n
        return scored, k

    def fit(self, Y: np.ndarray, *, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
            block: int | None = None, memory: int = MEMORY_BYTES, xty: np.ndarray | None = None,
            sums: TrainingSums | None = None, threads: int | None = None) -> RidgeFit:
        """Heads for the columns `cols` of Y (rows `rows` of Y are the design's rows), in gene chunks.

        `xty` (p, len(cols)), optional: Xc'Yc of the centred design and the centred selected targets, computed by
        the caller (`fit genes` makes every fold's from one X'Y per gene chunk). Then c = U'y = V'(Xc'y)/s comes
        from it, a p x r x genes product instead of the n x r x genes one; the rest of the fit is unchanged.
        `sums` (with `xty`): the selected targets' training means and sums of squares and a float32 copy of Y (see
        TrainingSums); the residuals are then made from that copy's rows and Y itself is read only for the genes
        re-scored in float64, so no float64 copy of the training rows is made.
        `threads` (default: every core, one in a parallel_map worker): gene chunks fitted at once, each on one BLAS thread (`_workers`)."""
        Y = np.asarray(Y)
        if Y.ndim == 1:
            Y = Y[:, None]
        rows = None if rows is None else np.asarray(rows)
        cols = np.arange(Y.shape[1]) if cols is None else np.flatnonzero(cols) if np.asarray(cols).dtype == bool \
            else np.asarray(cols)
        n, g = self.n, len(cols)
        # a contiguous column range (the default: every column) is sliced, not gathered
        contiguous = int(cols[0]) if g and (np.diff(cols) == 1).all() else None
        if (Y.shape[0] if rows is None else len(rows)) != n:
            raise HefeatError(f"ridge needs >= 3 samples with matching X and Y rows (got X ({n}, {self.p}), "
                              f"Y {Y.shape})")
        if sums is not None and (xty is None or sums.mean.shape != (g,) or sums.y2.shape != (g,)):
            raise ValueError("TrainingSums need xty and one mean and sum of squares per selected column")
        A = len(self.alphas)
        # Few genes (spot heads: hundreds of genes, 1,024-d, 30,000 spots): scoring each penalty's residuals
        # directly costs A·n·r·g, less than the bounded path's per-basis factors (~A·n·r²) plus its ~3·n·r·g.
        direct = self._parts is None and g * max(A - 3, 1) < A * self.rank
        workers = 1 if direct else self._workers(g, threads)
        step = min(block or _chunk(n, self.rank, A, g, memory // workers), -(-g // workers))
        out = RidgeFit(coef=np.empty((self.p, g)), intercept=np.empty(g), alpha=np.empty(g), loo_mse=np.empty(g))
        if not direct:  # the shared factors, made here on every BLAS thread ([U | 1] and U∘δ are made under the lock)
            _ = self.parts

        def one(j0: int) -> tuple[int, int]:
            cj = cols[j0:j0 + step]
            sl = cj if contiguous is None else slice(contiguous + j0, contiguous + j0 + len(cj))
            xj = None if xty is None else xty[:, j0:j0 + step]
            sj = None if sums is None else (sums.mean[j0:j0 + step], sums.y2[j0:j0 + step])
            return self._fit_block(Y, rows, cj, sl, xj, sums, sj, direct, out, j0)

        if workers == 1:
            counts = [one(j0) for j0 in range(0, g, step)]
        else:
            with single_blas_thread():
                counts = thread_map(one, list(range(0, g, step)), workers)
        with self._lock:
            self.pairs_scored += sum(c[0] for c in counts)
            self.genes_scored += sum(c[1] for c in counts)
        return out

    def _workers(self, g: int, threads: int | None) -> int:
        """Gene chunks fitted at once. Each runs every step of its chunk (gathers, squares, GEMMs on one BLAS thread),
        so both cores stay busy through the single-threaded steps too: one fold of 4,000 genes x 8,000 samples took
        0.42-0.71 s on two threads against 0.65-0.88 s serially with threaded BLAS on the quiet 2-core machine (and
        the threaded BLAS calls wait on a busy core: 2.5-3.1 s at load 3). At least THREAD_MIN_GENES per chunk."""
        return split_threads(g, THREAD_MIN_GENES, threads)

    def _fit_block(self, Y: np.ndarray, rows: np.ndarray | None, cj: np.ndarray, sl, xty: np.ndarray | None,
                   sums: TrainingSums | None, sj: tuple | None, direct: bool, out: RidgeFit,
                   j0: int) -> tuple[int, int]:
        """Fit the chunk of columns cj (`sl`: the same as a slice when contiguous) into out[..., j0:j0 + len(cj)];
        returns the chunk's (pairs_scored, genes_scored)."""
        U, s, s2, V, alphas = self.U, self.s, self.s2, self.V, self.alphas
        n, A, k = self.n, len(alphas), len(cj)
        # (r, k) float64: the coefficients and the exact re-scoring use it (U = Xc V / s)
        C = None if xty is None else (V.T @ xty) / s[:, None]
        if sums is None or direct or len(self.f64) or not len(self.f32):
            Yj = _take(Y, rows, sl)
            if not np.isfinite(Yj).all():
                raise HefeatError("ridge inputs contain NaN or inf; drop or impute those samples/genes first")
            y_mean = Yj.mean(0)
            Yj -= y_mean
            C = U.T @ Yj if C is None else C
            y2 = np.einsum("ik,ik->k", Yj, Yj)
            Qt, shift = None, None
        else:  # NaN or inf in any training row makes its column's sums non-finite
            y_mean, y2 = sj
            if not (np.isfinite(y_mean).all() and np.isfinite(y2).all()):
                raise HefeatError("ridge inputs contain NaN or inf; drop or impute those samples/genes first")
            Yj = None
            Qt, shift = sums.rows32(rows, sl), y_mean - sums.offset[sl]

        def centred(idx: np.ndarray) -> np.ndarray:
            """Float64 centred targets of chunk columns idx (for the exact re-scoring)."""
            return Yj[:, idx] if Yj is not None else _take(Y, rows, cj[idx]) - y_mean[idx]

        counts = (0, 0)
        if direct:
            mse = self._score_direct(Yj, C)
        else:
            mse = np.empty((A, k))
            if len(self.f32):
                counts = self._score_bounded(_rows_f32(Yj) if Qt is None else Qt, C, y2, mse, shift)
            for a in self.f64:  # exploding weights or dtype=float64: float64 residuals
                mse[a] = _loo_mse_exact(U, s2[:, None], self.h_all[:, a], alphas[a], Yj, C)
        ia = np.argmin(mse, 0)
        if len(self.f32) and A > 1:  # penalties within float32 error of the best: float64
            cols_k = np.arange(k)
            m1 = np.abs(mse[ia, cols_k])
            close = mse <= m1 + TIE_TOL * (m1 + np.sqrt(m1 * y2 / n))
            close[self.f64] = False
            close[ia, cols_k] = True
            amb = np.flatnonzero(close.sum(0) > 1)
            if len(amb):
                cand = close[:, amb]
                exact = np.full((A, len(amb)), np.inf)
                Ya = centred(amb)
                for a in np.flatnonzero(cand.any(1)):
                    sel = np.flatnonzero(cand[a])
                    exact[a, sel] = _loo_mse_exact(U, s2[:, None], self.h_all[:, a], alphas[a],
                                                   Ya[:, sel], C[:, amb[sel]])
                ia[amb] = np.argmin(exact, 0)
                mse[ia[amb], amb] = exact[ia[amb], np.arange(len(amb))]
        j1 = j0 + k
        out.alpha[j0:j1] = alphas[ia]
        out.loo_mse[j0:j1] = mse[ia, np.arange(k)]
        out.coef[:, j0:j1] = V @ ((s[:, None] / (s2[:, None] + alphas[ia][None, :])) * C)
        out.intercept[j0:j1] = y_mean - self.x_mean @ out.coef[:, j0:j1]
        return counts


@dataclass(frozen=True)
class TrainingSums:
    """What `RidgeBasis.fit` needs of the selected targets when the caller has their training sums (`fit genes`
    makes each fold's from whole-chunk sums): mean (g,) and y2 (g,) = Σ (y - mean)² over the training rows, and
    y32 (columns of Y, rows of Y) float32 = Y.T - offset[:, None] for every column of Y, made once per gene chunk
    and read by every fold, the final fit and the permuted CVs (offset: e.g. each column's mean over all rows, so
    that float32 keeps the digits that vary)."""

    mean: np.ndarray
    y2: np.ndarray
    y32: np.ndarray
    offset: np.ndarray

    def rows32(self, rows: np.ndarray | None, cols) -> np.ndarray:
        """y32's columns `cols` (slice or indices) and rows `rows` (None: all) as a new (k, n) float32 array."""
        if rows is None:
            return self.y32[cols].copy()
        if isinstance(cols, slice):
            return self.y32[cols].take(rows, axis=1)
        return self.y32[np.ix_(cols, rows)]  # one gather, not the columns' copy and then its rows

    @staticmethod
    def gene_major(Y: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(g, n) float32 copy of Y (n, g) minus offset (g,) per column, as TrainingSums.y32 (into `out` when given)."""
        out = np.empty(Y.shape[::-1], np.float32) if out is None else out
        np.subtract(Y.T, offset[:, None], out=out, casting="same_kind")
        return out


def _rows_f32(Yj: np.ndarray) -> np.ndarray:
    """(k, n) C-ordered float32 copy of Yj (n, k): a plain cast of gene-major (Fortran-ordered) targets."""
    if Yj.flags.f_contiguous:
        return Yj.astype(np.float32, order="F").T
    return np.ascontiguousarray(Yj.T, dtype=np.float32)


def fit_ridge_heads(X: np.ndarray, Y: np.ndarray, *, alphas=DEFAULT_ALPHAS, dtype=np.float32,
                    block: int | None = None, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
                    memory: int = MEMORY_BYTES) -> RidgeFit:
    """Ridge per target column of Y (n, g) on X (n, p), each with its own LOO-best penalty from `alphas`.

    `dtype` is the precision of the large products (float32: fast, ties re-scored in float64; float64:
    everything in double). `rows`/`cols` select samples/targets of Y without copying the whole matrix
    (X is then already the selected rows). `block` fixes the genes per chunk (default: sized to `memory`).
    """
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y)
    n_y = (Y.shape[0] if rows is None else len(rows)) if Y.ndim else 0
    if X.shape[0] < 3 or n_y != X.shape[0]:
        raise HefeatError(f"ridge needs >= 3 samples with matching X and Y rows (got X {X.shape}, Y {Y.shape})")
    return RidgeBasis(X, alphas, dtype).fit(Y, rows=rows, cols=cols, block=block, memory=memory)


class RidgeHeads(RegressorMixin, BaseEstimator):
    """Estimator form (scikit-learn compatible): one ridge head per target, penalty per target by efficient LOO.

    Parameters
    ----------
    alphas : candidate penalties.
    pca : optional number of principal components of X fitted first (on the training data).
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, *, pca: int | None = None, random_state: int = 0):
        self.alphas = alphas
        self.pca = pca
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, *, rows: np.ndarray | None = None,
            cols: np.ndarray | None = None) -> RidgeHeads:
        """Fit on X of shape (n, p) and Y of shape (n, g) (or Y[rows][:, cols] without the copy); returns self."""
        X = np.asarray(X, np.float64)
        if self.pca:
            from sklearn.decomposition import PCA

            k = min(self.pca, X.shape[0] - 1, X.shape[1])
            self.pca_ = PCA(n_components=k, random_state=self.random_state).fit(X)
            X = self.pca_.transform(X)
        else:
            self.pca_ = None
        self.fit_ = fit_ridge_heads(X, Y, alphas=self.alphas, rows=rows, cols=cols)
        self.alpha_ = self.fit_.alpha
        self.coef_, self.intercept_ = self.fit_.coef, self.fit_.intercept
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions of shape (n, g) for X of shape (n, p)."""
        X = np.asarray(X, np.float64)
        if self.pca_ is not None:
            X = self.pca_.transform(X)
        return self.fit_.predict(X)
