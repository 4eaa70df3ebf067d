"""Closed-form multi-target ridge with a per-target penalty chosen by efficient leave-one-out.

One decomposition of the centred design serves every gene and every candidate penalty: with
Xc = U S V' (from the eigendecomposition of the smaller Gram matrix, Xc'Xc or XcXc'), the hat matrix
for penalty a is 11'/n + U diag(d) U' with d = s²/(s²+a), and the leave-one-out residual of sample i
is r_i / (1 - h_i) (Allen 1974; Golub, Heath & Wahba 1979). The intercept is unpenalised, as in
scikit-learn's RidgeCV, whose `alpha_per_target=True` path this reproduces.

At transcriptome scale (20,000 genes x 10,000 samples) the n x g residual matrix is never formed per
penalty. With c = U'y, the least-squares residual q = y - U c and e = 1 - d = a/(s²+a), the residual
is r = q + U(e∘c), so for the LOO weights w = 1/(1-h)²

    n·MSE(a) = Σ w q²  +  2 (e∘c)·(U' diag(w) q)  +  (e∘c)' (U' diag(w) U) (e∘c),

which for every penalty at once is one GEMM of [U∘w(a₁) … U∘w(a_A)]' (n x A·r) with q (n x genes)
(in its low-rank form, below). The middle term is then Σ_m Γ_ma e_a·(c∘(U∘b_m)'q): small (A x r) GEMMs,
no A x r x genes array; the last is |L_a'(e∘c)|² with L_a the Cholesky factor of U' diag(w_a) U (w >= 1,
so it is well conditioned): one triangular product per penalty, half a general one. Genes stream in
chunks sized to memory. The big GEMMs run in float32;
the decomposition, c and the final coefficients are float64, and genes whose best two penalties are
within float32 error of each other are re-scored exactly in float64, so the chosen penalties are the
float64 ones. The n x A weight matrix is smooth in the penalty, so the GEMM uses its truncated SVD
(m <= A blocks of U∘b instead of A; see RidgeBasis). A fit with few targets (genes x A < m x r) skips
the GEMM set-up and scores each penalty's residuals directly (float32 GEMMs where the weights are tame,
near ties re-scored in float64 as on the GEMM path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas
from sklearn.base import BaseEstimator, RegressorMixin

from hefeat.errors import HefeatError

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
MEMORY_BYTES = 1 << 30  # working memory of the gene chunks (the design and its decomposition come on top)
TIE_TOL = 5e-5  # relative MSE gap below which float32 scores are re-checked in float64 (measured float32
# score error: <= 3.1e-7 relative at 8,000 samples on the fabricated store; 2e-4 re-scored a third of the genes)
MAX_WEIGHT_F32 = 4.0  # LOO weights 1/(1-h)² above this (leverage > 1/2) are scored in float64
LOW_RANK_TOL = 1e-6  # relative error allowed in the low-rank LOO weights of the float32 penalties (the scores
# then err by <= 1e-6 relative, far inside TIE_TOL; 1e-7 needed 10 GEMM blocks instead of 9 at 800 x 256)
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


def _decompose(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (n, r), s (r,), V (p, r) of the centred design from the smaller Gram matrix (float64), rank-truncated."""
    n, p = Xc.shape
    if n >= p:
        s2, V = np.linalg.eigh(Xc.T @ Xc)
    else:
        s2, U = np.linalg.eigh(Xc @ Xc.T)
    top = s2.max() if len(s2) else 0.0
    keep = s2 > top * max(n, p) * np.finfo(np.float64).eps if top > 0 else np.zeros(len(s2), bool)
    s2 = s2[keep][::-1]
    s = np.sqrt(s2)
    if n >= p:
        V = V[:, keep][:, ::-1]
        U = (Xc @ V) / s
    else:
        U = U[:, keep][:, ::-1]
        V = (Xc.T @ U) / s
    return U, s, V


def _chunk(n: int, r: int, A: int, m: int, g: int, memory: int) -> int:
    per_gene = 8 * n + 4 * n * 3 + 4 * r * (m + 2) + 4 * m * A + 8 * A * 2  # float64 y; float32 q, q², U c; z
    return int(max(1, min(g, memory // per_gene)))


def _low_rank(W: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """B (n, m), G (m, A) with B @ G within `tol` of W relative to every entry (W > 0), m as small as that allows."""
    u, sv, vt = np.linalg.svd(W, full_matrices=False)
    for m in range(1, len(sv) + 1):
        B, G = u[:, :m] * sv[:m], vt[:m]
        if np.abs(B @ G - W).max() <= tol * W.min():
            return B, G
    return W, np.eye(W.shape[1])  # cannot happen (m = A is exact up to rounding), but stay exact if it did


def _take(Y: np.ndarray, rows: np.ndarray | None, cols) -> np.ndarray:
    """A float64 copy of Y[rows][:, cols] (the caller centres it in place), copied once."""
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
    of every candidate penalty and the products the scores need. Build once per design (a CV fold), then
    `fit` any number of target matrices or gene chunks against it.

    The LOO weights w(a) = 1/(1-h(a))² of the float32 penalties form an n x A matrix of low numerical rank
    (smooth in a): it is replaced by its truncated SVD B Γ wherever it stays within LOW_RANK_TOL of every
    weight, so the big GEMM has m·r columns instead of A·r (m = 6 of 15 at 8,000 samples with a few strong
    feature directions, 13 when feature scales spread widely, as on the fabricated store). Every score is the
    exact LOO MSE under weights within LOW_RANK_TOL relative of the true ones (well inside TIE_TOL, below
    which near ties are re-scored exactly in float64).
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
        U, A = self.U, len(alphas)
        r = len(self.s)
        self.s2 = s2 = self.s * self.s
        D = s2[:, None] / (s2[:, None] + alphas[None, :])  # (r, A) shrinkage of each component
        self.E = alphas[None, :] / (s2[:, None] + alphas[None, :])  # 1 - D without the cancellation
        self.h_all = 1.0 / n + (U * U) @ D  # (n, A) leverages
        w_all = 1.0 / (1.0 - self.h_all) ** 2  # (n, A) LOO weights
        # float32 where the weights are tame (no leverage near 1: the terms of the sum cannot cancel much);
        # penalties whose LOO weights explode (n near the rank, small penalties) are scored in float64.
        f32 = np.flatnonzero(w_all.max(0) <= MAX_WEIGHT_F32) if np.dtype(dtype) == np.float32 else np.arange(0)
        self.f32, self.f64 = f32, np.setdiff1d(np.arange(A), f32)
        self.w_all = w_all
        self._low = []  # (penalty indices, dtype, B, Γ, weights) per precision; the GEMM operands come lazily
        for idx, dt in ((self.f32, np.float32), (self.f64, np.float64)):
            if not len(idx):
                continue
            W = w_all[:, idx]
            if dt == np.float32 and len(idx) > 1:
                B, G = _low_rank(W, LOW_RANK_TOL)
                W = B @ G  # the weights every term of the score uses (see the class docstring)
            else:
                B, G = W, np.eye(len(idx))
            self._low.append((idx, dt, B, G, W))
        self._parts = None
        self._U32 = None  # U in float32 for the direct scores (few genes), made on first use
        self.rank = r

    @property
    def parts(self) -> list:
        """Per precision: penalty indices, dtype, U, [U∘b_1 … U∘b_m], Γ (m, |idx|), E' (|idx|, r), and the
        Cholesky factors of U' diag(w_a) U (stored transposed, so that `[a].T` is the lower factor in
        Fortran order for BLAS trmm), weights (built once)."""
        if self._parts is None:
            U, r = self.U, self.rank
            self._parts = []
            for idx, dt, B, G, W in self._low:
                UB = np.concatenate([U * B[:, [m]] for m in range(B.shape[1])], axis=1).astype(dt)  # (n, m·r)
                Ud = U.astype(dt)
                N = (UB.T @ Ud).reshape(B.shape[1], r * r).astype(np.float64)  # U' diag(b_m) U
                M = (G.T @ N).reshape(len(idx), r, r)  # U' diag(w_a) U = Σ_m Γ_ma U' diag(b_m) U
                M = (M + M.transpose(0, 2, 1)) / 2
                LT = np.linalg.cholesky(M).transpose(0, 2, 1).astype(dt)  # w >= 1: M >= I, well conditioned
                self._parts.append((idx, dt, Ud, UB, G.astype(dt),
                                    np.ascontiguousarray(self.E.T[idx], dt), LT, W.astype(dt)))
        return self._parts

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

    def fit(self, Y: np.ndarray, *, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
            block: int | None = None, memory: int = MEMORY_BYTES) -> RidgeFit:
        """Heads for the columns `cols` of Y (rows `rows` of Y are the design's rows), in gene chunks."""
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
        U, s, s2, V, alphas = self.U, self.s, self.s2, self.V, self.alphas
        r, A = self.rank, len(alphas)
        m_all = sum(low[2].shape[1] for low in self._low)
        # Few genes (spot heads: hundreds of genes, 1,024-d, 30,000 spots): scoring each penalty's residuals in
        # float64 costs A·n·r·g, less than the GEMM path's U' diag(w) U products (m·n·r²) it would set up.
        direct = self._parts is None and g * len(alphas) < m_all * r
        m_max = max((low[2].shape[1] for low in self._low), default=1)
        coef = np.empty((self.p, g))
        intercept = np.empty(g)
        best_a = np.empty(g)
        best_mse = np.empty(g)
        step = block or _chunk(n, r, A, m_max, g, memory)
        for j0 in range(0, g, step):
            cj = cols[j0:j0 + step]
            k = len(cj)
            Yj = _take(Y, rows, cj if contiguous is None else slice(contiguous + j0, contiguous + j0 + k))
            if not np.isfinite(Yj).all():
                raise HefeatError("ridge inputs contain NaN or inf; drop or impute those samples/genes first")
            y_mean = Yj.mean(0)
            Yj -= y_mean
            C = U.T @ Yj  # (r, k) float64: the coefficients and the exact re-scoring use it
            mse = self._score_direct(Yj, C) if direct else np.empty((A, k))
            for idx, dt, Ud, UB, G, Et, LT, Wd in ([] if direct else self.parts):
                Cd = C.astype(dt)
                Q = Yj.astype(dt)
                Q -= Ud @ Cd  # least-squares residual (n, k)
                T1 = Wd.T @ (Q * Q)  # (|idx|, k): Σ w q²
                Z = (UB.T @ Q).reshape(G.shape[0], r, k)  # (U∘b_m)' q for each weight component m
                Z *= Cd
                # 2 (e_a∘c)·(U' diag(w_a) q) = 2 Σ_m Γ_ma e_a·(c∘(U∘b_m)'q): m small GEMMs, no (A, r, k) array
                lin = np.einsum("ma,mak->ak", G, np.matmul(Et, Z))
                mse[idx] = T1
                mse[idx] += 2 * lin
                trmm = _TRMM[np.dtype(dt).char]
                for i, a in enumerate(idx):
                    EC = Et[i][:, None] * Cd  # (r, k) shrunk part of the residual
                    # (e∘c)' U' diag(w_a) U (e∘c) = |L_a'(e∘c)|² with L_a L_a' = U' diag(w_a) U: one trmm
                    T = trmm(1.0, LT[i].T, EC.T, side=1, lower=1, overwrite_b=1).T  # (r, k)
                    mse[a] += np.einsum("rk,rk->k", T, T, dtype=np.float64)
                mse[idx] /= n
            ia = np.argmin(mse, 0)
            if len(self.f32) and A > 1:  # penalties within float32 error of the best: float64
                cols_k = np.arange(k)
                m1 = np.abs(mse[ia, cols_k])
                close = mse <= m1 + TIE_TOL * (m1 + np.sqrt(m1 * np.einsum("ik,ik->k", Yj, Yj) / n))
                close[self.f64] = False
                close[ia, cols_k] = True
                amb = np.flatnonzero(close.sum(0) > 1)
                if len(amb):
                    cand = close[:, amb]
                    exact = np.full((A, len(amb)), np.inf)
                    for a in np.flatnonzero(cand.any(1)):
                        sel = np.flatnonzero(cand[a])
                        exact[a, sel] = _loo_mse_exact(U, s2[:, None], self.h_all[:, a], alphas[a],
                                                       Yj[:, amb[sel]], C[:, amb[sel]])
                    ia[amb] = np.argmin(exact, 0)
                    mse[ia[amb], amb] = exact[ia[amb], np.arange(len(amb))]
            best_a[j0:j0 + step] = alphas[ia]
            best_mse[j0:j0 + step] = mse[ia, np.arange(k)]
            coef[:, j0:j0 + step] = V @ ((s[:, None] / (s2[:, None] + alphas[ia][None, :])) * C)
            intercept[j0:j0 + step] = y_mean - self.x_mean @ coef[:, j0:j0 + step]
        return RidgeFit(coef=coef, intercept=intercept, alpha=best_a, loo_mse=best_mse)


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
