"""Per-gene ridge against scikit-learn's RidgeCV, and GCV's behaviour on noise."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from hefeat.errors import HefeatError
from hefeat.learn.ridge import RidgeHeads, fit_ridge_heads

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@pytest.mark.parametrize(("n", "p"), [(40, 10), (30, 80)])
def test_ridge_matches_sklearn_ridgecv(n, p):
    """Coefficients, intercepts and chosen α equal RidgeCV(alpha_per_target=True) (efficient LOO)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, p))
    W = rng.normal(size=(p, 6)) * np.array([3, 1, 0.3, 0.1, 0, 0])
    Y = X @ W + rng.normal(size=(n, 6)) * np.array([0.5, 1, 1, 1, 1, 3]) + 5
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(X, Y)
    fit = fit_ridge_heads(X, Y, alphas=ALPHAS)
    np.testing.assert_array_equal(fit.alpha, ref.alpha_)
    np.testing.assert_allclose(fit.coef, ref.coef_.T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.intercept, ref.intercept_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.predict(X), ref.predict(X), rtol=1e-6, atol=1e-8)


def test_gcv_picks_large_penalty_for_noise():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 30))
    noise = rng.normal(size=(60, 20))
    signal = X[:, :1] * 2 + 0.1 * rng.normal(size=(60, 1))
    fit = fit_ridge_heads(X, np.c_[signal, noise], alphas=np.logspace(-2, 5, 15))
    assert fit.alpha[0] <= 1.0
    assert np.median(fit.alpha[1:]) >= 1e3


def test_blocking_does_not_change_results():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(25, 12)), rng.normal(size=(25, 37))
    a, b = fit_ridge_heads(X, Y, block=5), fit_ridge_heads(X, Y)
    np.testing.assert_allclose(a.coef, b.coef)
    np.testing.assert_array_equal(a.alpha, b.alpha)


def test_estimator_with_pca_and_bad_input():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 50))
    Y = X[:, :2] @ [[1.0], [2.0]] + 0.1 * rng.normal(size=(30, 1))
    m = RidgeHeads(pca=10).fit(X, Y)
    assert m.pca_.n_components_ == 10 and m.predict(X).shape == (30, 1)
    with pytest.raises(HefeatError, match="NaN"):
        fit_ridge_heads(X, np.where(np.eye(30, 1) > 0, np.nan, Y))
    with pytest.raises(HefeatError, match="samples"):
        fit_ridge_heads(X[:2], Y[:2])
