"""Closed-form multi-target ridge with a per-target penalty chosen by efficient leave-one-out.

One SVD of the centred design serves every gene and every candidate penalty: for penalty a the
hat matrix is 11'/n + U diag(s²/(s²+a)) U', so leave-one-out residuals are (y - ŷ)/(1 - h_ii) for
all genes at once. The intercept is unpenalised (as in scikit-learn's RidgeCV, whose default
`alpha_per_target=True` path this reproduces).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from hefeat.errors import HefeatError

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))


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


def fit_ridge_heads(X: np.ndarray, Y: np.ndarray, *, alphas=DEFAULT_ALPHAS, dtype=np.float64,
                    block: int = 4096) -> RidgeFit:
    """Ridge per target column of Y (n, g) on X (n, p), each with its own LOO-best penalty from `alphas`."""
    X = np.asarray(X, dtype)
    Y = np.asarray(Y, dtype)
    if Y.ndim == 1:
        Y = Y[:, None]
    n = X.shape[0]
    if n < 3 or Y.shape[0] != n:
        raise HefeatError(f"ridge needs >= 3 samples with matching X and Y rows (got X {X.shape}, Y {Y.shape})")
    if not np.isfinite(X).all() or not np.isfinite(Y).all():
        raise HefeatError("ridge inputs contain NaN or inf; drop or impute those samples/genes first")
    alphas = np.asarray(sorted(alphas), dtype)
    if (alphas <= 0).any():
        raise HefeatError("ridge penalties must be > 0")
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc = X - x_mean
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    keep = s > s.max() * max(X.shape) * np.finfo(dtype).eps if len(s) else s > 0
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    s2 = s * s
    U2 = U * U
    g = Y.shape[1]
    best_mse = np.full(g, np.inf)
    best_a = np.zeros(g, dtype)
    for j0 in range(0, g, block):  # blocks of genes bound the memory of (n, block) temporaries
        Yc = Y[:, j0:j0 + block] - y_mean[j0:j0 + block]
        UtY = U.T @ Yc
        for a in alphas:
            d = s2 / (s2 + a)
            fitted = U @ (d[:, None] * UtY)
            h = 1.0 / n + U2 @ d
            loo = (Yc - fitted) / (1.0 - h)[:, None]
            mse = (loo * loo).mean(0)
            better = mse < best_mse[j0:j0 + block]
            best_mse[j0:j0 + block][better] = mse[better]
            best_a[j0:j0 + block][better] = a
    coef = np.empty((X.shape[1], g), dtype)
    for a in np.unique(best_a):
        cols = np.flatnonzero(best_a == a)
        Yc = Y[:, cols] - y_mean[cols]
        coef[:, cols] = Vt.T @ ((s / (s2 + a))[:, None] * (U.T @ Yc))
    intercept = y_mean - x_mean @ coef
    return RidgeFit(coef=coef, intercept=intercept, alpha=best_a, loo_mse=best_mse)


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

    def fit(self, X: np.ndarray, Y: np.ndarray) -> RidgeHeads:
        """Fit on X of shape (n, p) and Y of shape (n, g); returns self."""
        X = np.asarray(X, np.float64)
        if self.pca:
            from sklearn.decomposition import PCA

            k = min(self.pca, X.shape[0] - 1, X.shape[1])
            self.pca_ = PCA(n_components=k, random_state=self.random_state).fit(X)
            X = self.pca_.transform(X)
        else:
            self.pca_ = None
        self.fit_ = fit_ridge_heads(X, Y, alphas=self.alphas)
        self.alpha_ = self.fit_.alpha
        self.coef_, self.intercept_ = self.fit_.coef, self.fit_.intercept
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions of shape (n, g) for X of shape (n, p)."""
        X = np.asarray(X, np.float64)
        if self.pca_ is not None:
            X = self.pca_.transform(X)
        return self.fit_.predict(X)
