"""Per-gene ridge against scikit-learn's RidgeCV, and GCV's behaviour on noise."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from hefeat.errors import HefeatError
from hefeat.learn.ridge import RidgeHeads, fit_ridge_heads

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@pytest.mark.parametrize(("n", "p"), [(40, 10), (30, 80)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ridge_matches_sklearn_ridgecv(n, p, dtype):
    """Coefficients, intercepts and chosen α equal RidgeCV(alpha_per_target=True) (efficient LOO)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, p))
    W = rng.normal(size=(p, 6)) * np.array([3, 1, 0.3, 0.1, 0, 0])
    Y = X @ W + rng.normal(size=(n, 6)) * np.array([0.5, 1, 1, 1, 1, 3]) + 5
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(X, Y)
    fit = fit_ridge_heads(X, Y, alphas=ALPHAS, dtype=dtype)
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


@pytest.mark.parametrize(("n", "p"), [(300, 24), (60, 90)])
def test_many_genes_float32_chunks_match_sklearn(n, p):
    """Transcriptome path (float32 GEMMs, small gene chunks, float64 re-scoring of near ties): same penalties
    and predictions as RidgeCV to 1e-6, for noise genes, weak genes and genes fitted almost exactly."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(n, p)) * np.exp(rng.normal(size=p)) + 3
    g = 400
    W = rng.normal(size=(p, g)) * (rng.random(g) < 0.5)
    noise = rng.normal(size=(n, g)) * np.r_[np.full(100, 1e-3), np.full(200, 1.0), np.full(100, 30.0)]
    Y = X @ W + noise + rng.normal(size=g) * 10
    alphas = np.logspace(-2, 5, 15)
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
    fit = fit_ridge_heads(X, Y, alphas=alphas, block=37)
    np.testing.assert_array_equal(fit.alpha, ref.alpha_)
    Xt = rng.normal(size=(20, p)) * np.exp(rng.normal(size=p)) + 3
    np.testing.assert_allclose(fit.predict(Xt), ref.predict(Xt), rtol=1e-6, atol=1e-6 * np.abs(Y).max())
    # Its LOO MSEs are the float64 ones to float32 accuracy (relative to the gene's variance).
    full = fit_ridge_heads(X, Y, alphas=alphas, dtype=np.float64)
    assert (np.abs(fit.loo_mse - full.loo_mse) <= 1e-4 * full.loo_mse + 1e-7 * Y.var(0)).all()


def test_rows_and_cols_select_without_copying():
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(50, 8)), rng.normal(size=(50, 30))
    rows, cols = np.arange(3, 45), rng.random(30) < 0.5
    a = fit_ridge_heads(X[rows], Y, rows=rows, cols=cols)
    b = fit_ridge_heads(X[rows], Y[rows][:, cols])
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-12)
    m = RidgeHeads().fit(X[rows], Y, rows=rows, cols=np.flatnonzero(cols))
    np.testing.assert_allclose(m.predict(X), b.predict(X), rtol=1e-12)


def test_bounded_scores_and_shared_basis_match_sklearn():
    """Many samples, few strong directions: most penalties are excluded by the cross-term bound (fewer than 6
    of 15 scored exactly per gene); penalties still equal RidgeCV's, LOO MSEs the float64 ones, and one basis
    refitted on other targets equals a fresh fit."""
    from hefeat.learn.ridge import RidgeBasis

    rng = np.random.default_rng(6)
    n, p, g = 1500, 16, 120
    X = rng.normal(size=(n, 3)) @ rng.normal(size=(3, p)) * 3 + rng.normal(size=(n, p))
    Y = X @ (rng.normal(size=(p, g)) * (rng.random(g) < 0.5)) * 0.05 + rng.normal(size=(n, g))
    alphas = np.logspace(-2, 5, 15)
    basis = RidgeBasis(X, alphas)
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
    fit = basis.fit(Y, block=50)
    assert len(basis.f32) == 15 and basis.genes_scored == g  # the bounded path is the one tested
    assert basis.pairs_scored < 6 * g
    np.testing.assert_array_equal(fit.alpha, ref.alpha_)
    np.testing.assert_allclose(fit.predict(X), ref.predict(X), rtol=1e-6, atol=1e-9)
    exact = fit_ridge_heads(X, Y, alphas=alphas, dtype=np.float64)
    np.testing.assert_allclose(fit.loo_mse, exact.loo_mse, rtol=1e-5)
    rows = np.arange(n)[::-1]
    again, fresh = basis.fit(Y[::-1][rows], cols=np.arange(0, g, 3)), fit_ridge_heads(X, Y[:, ::3], alphas=alphas)
    np.testing.assert_array_equal(again.alpha, fresh.alpha)
    np.testing.assert_allclose(again.coef, fresh.coef, rtol=1e-10, atol=1e-14)
    # Two rounds (each gene's likeliest penalty, then the candidates reaching its exact score) score fewer pairs than
    # every candidate of the bounds in one round, with the penalties above.
    Yc = Y - Y.mean(0)
    y2 = np.einsum("ij,ij->j", Yc, Yc)
    _, _, est, bnd = RidgeBasis(X, alphas)._bracket(np.ascontiguousarray(Yc.T, np.float32), basis.U.T @ Yc, None, y2)
    top = (est + bnd).min(0)
    one_round = int((est - bnd <= top + basis._slack(top, y2)).sum())
    counted = RidgeBasis(X, alphas)
    counted.fit(Y, block=50)
    assert g <= counted.pairs_scored < one_round


@pytest.mark.parametrize("seed", [10, 11])
def test_cross_term_bound_brackets_the_exact_scores(seed):
    """The bracket [T - B, T + B] of every penalty's n·MSE (the cross term bounded by Cauchy-Schwarz with the
    centred LOO weights, using U'q = 0) contains the float64 LOO score, for feature scales spread over two
    decades and targets from noise to nearly exact; and it is not vacuous (B well below T)."""
    from hefeat.learn.ridge import RidgeBasis, _rows_f32

    rng = np.random.default_rng(seed)
    n, p, g = 600, 40, 90
    X = rng.normal(size=(n, p)) * np.exp(rng.normal(size=p)) + 2
    Y = X @ rng.normal(size=(p, g)) * (rng.random(g) < 0.6) + rng.normal(size=(n, g)) * np.exp(rng.normal(size=g) * 2)
    basis = RidgeBasis(X, np.logspace(-2, 5, 15))
    Yc = Y - Y.mean(0)
    C = basis.U.T @ Yc
    _, _, T, B = basis._bracket(_rows_f32(Yc), C)
    # with y2: the cheap intervals (|U'diag(δ)U| <= max|δ|) where they already exclude a penalty, the forms elsewhere
    _, _, T2, B2 = basis._bracket(_rows_f32(Yc), C, y2=(Yc * Yc).sum(0))
    Q = Yc - basis.U @ C
    S = np.array([basis.w_all[:, a] @ ((Q + basis.U @ (basis.E[:, [a]] * C)) ** 2) for a in basis.f32])  # exact n·MSE
    for t, b in ((T, B), (T2, B2)):
        assert (np.abs(S - t) <= b + 1e-5 * S).all()
    assert np.median(B / T) < 0.2
    cheap = B2 > B * (1 + 1e-9)
    assert 0.2 < cheap.mean() < 1  # the cheap intervals are used, and not for everything
    best = S.argmin(0)
    assert not cheap[best, np.arange(g)].any()  # never for a gene's best penalty


def test_near_ties_are_decided_in_float64():
    """Penalties 1e-7 apart give LOO MSEs closer than float32 can tell apart: the float64 re-scoring of near
    ties must pick RidgeCV's penalty for every gene (float32 scores alone pick wrongly for some)."""
    rng = np.random.default_rng(7)
    n, p, g = 400, 20, 300
    X = rng.normal(size=(n, p))
    Y = X @ rng.normal(size=(p, g)) * 0.3 + rng.normal(size=(n, g))
    alphas = (30.0, 30.0 * (1 + 1e-7), 30.0 * (1 + 2e-7), 1e4)
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
    np.testing.assert_array_equal(fit_ridge_heads(X, Y, alphas=alphas).alpha, ref.alpha_)


def test_contiguous_columns_are_sliced_not_modified():
    """A contiguous column range is sliced from Y rather than gathered; the caller's Y is left untouched and the
    heads equal those of a gathered (non-contiguous) selection."""
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(40, 6)), rng.normal(size=(40, 12)) + 3
    before = Y.copy()
    a = fit_ridge_heads(X, Y, block=5)
    np.testing.assert_array_equal(Y, before)
    b = fit_ridge_heads(X[5:], Y, rows=np.arange(5, 40), cols=np.arange(2, 9), block=3)
    c = fit_ridge_heads(X[5:], Y[5:, 2:9].copy(order="F"))
    np.testing.assert_array_equal(Y, before)
    np.testing.assert_allclose(b.coef, c.coef, rtol=1e-12)
    assert a.coef.shape == (6, 12)


def test_near_ties_with_few_genes_are_decided_in_float64():
    """Few genes (the direct path that scores each penalty's residuals, in float32 for tame weights): near ties
    are re-scored in float64 there too, so penalties 1e-7 apart still give RidgeCV's choice for every gene."""
    from hefeat.learn.ridge import RidgeBasis

    rng = np.random.default_rng(9)
    n, p, g = 1000, 100, 20
    X = rng.normal(size=(n, p))
    Y = X @ rng.normal(size=(p, g)) * 0.3 + rng.normal(size=(n, g))
    alphas = (30.0, 30.0 * (1 + 1e-7), 30.0 * (1 + 2e-7), 1e4)
    basis = RidgeBasis(X, alphas)
    assert g * len(alphas) < basis.rank and len(basis.f32) == 4  # the direct path, float32 scores
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
    fit = basis.fit(Y)
    np.testing.assert_array_equal(fit.alpha, ref.alpha_)
    np.testing.assert_allclose(fit.predict(X), ref.predict(X), rtol=1e-6, atol=1e-9)


def test_small_factorisations_run_on_one_blas_thread_and_restore_the_pool():
    """eigh/Cholesky of order <= SMALL_LAPACK run with every BLAS pool at one thread, larger ones untouched, and the
    pools' sizes are restored afterwards (a kept threadpoolctl controller, not one per call)."""
    from threadpoolctl import threadpool_info

    from hefeat.learn import ridge, threads

    # numpy's own BLAS (the one np.linalg's eigh/cholesky call); libraries loaded after the controller was made
    # (faiss bundles an OpenBLAS) are not numpy's and keep their pools, so they are not counted here
    numpy_libs = {i["filepath"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]}
    assert numpy_libs, "numpy's BLAS not found by threadpoolctl"
    assert numpy_libs <= {i["filepath"] for i in threads._blas_controller().info()}

    def sizes():
        return [i["num_threads"] for i in threadpool_info() if i["filepath"] in numpy_libs]

    before = sizes()
    with ridge._one_blas_thread(ridge.SMALL_LAPACK):
        assert set(sizes()) == {1}
    assert sizes() == before
    with ridge._one_blas_thread(ridge.SMALL_LAPACK + 1):
        assert sizes() == before
    assert threads._blas_controller() is threads._blas_controller()


def test_training_sums_path_matches_the_rows_path():
    """Targets given as training sums and a float32 gene-major copy (offset by all rows' means, not the training
    rows'), training rows and columns gathered from it: the same penalties, coefficients and LOO MSEs as the fit
    that gathers the float64 rows itself. A wrong shift (offset not removed, or removed twice), rows gathered in
    the wrong order or columns misaligned with their sums all change the penalties or coefficients. NaN in a
    training row is refused through the sums."""
    from hefeat.learn.ridge import RidgeBasis, TrainingSums

    rng = np.random.default_rng(12)
    n_all, p, g = 500, 12, 60
    X = rng.normal(size=(n_all, p)) * np.exp(rng.normal(size=p))
    Y = X @ (rng.normal(size=(p, g)) * (rng.random(g) < 0.5)) * 0.2 + rng.normal(size=(n_all, g)) + 7
    Y = np.asfortranarray(Y)
    rows = rng.permutation(n_all)[:380]
    cols = np.sort(rng.choice(g, 45, replace=False))
    basis = RidgeBasis(X[rows], np.logspace(-2, 5, 15))
    want = basis.fit(Y, rows=rows, cols=cols)
    assert basis.genes_scored == len(cols)  # the bounded (float32 residual) path
    Yt = Y[rows][:, cols]
    mean = Yt.mean(0)
    xty = (X[rows] - X[rows].mean(0)).T @ (Yt - mean)
    offset = Y.mean(0)
    sums = TrainingSums(mean=mean, y2=((Yt - mean) ** 2).sum(0), y32=TrainingSums.gene_major(Y, offset), offset=offset)
    got = basis.fit(Y, rows=rows, cols=cols, xty=xty, sums=sums)
    np.testing.assert_array_equal(got.alpha, want.alpha)
    np.testing.assert_allclose(got.coef, want.coef, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.intercept, want.intercept, rtol=1e-12)
    np.testing.assert_allclose(got.loo_mse, want.loo_mse, rtol=1e-5)
    bad = sums.mean.copy()
    bad[3] = np.nan
    with pytest.raises(HefeatError, match="NaN"):
        basis.fit(Y, rows=rows, cols=cols, xty=xty, sums=TrainingSums(bad, sums.y2, sums.y32, sums.offset))


def test_gene_chunks_on_threads_give_the_serial_fit():
    """A fit whose genes are split over two threads (each chunk on one BLAS thread) returns the serial fit's
    penalties, LOO MSEs and coefficients, runs its chunks on two threads, counts every gene once, and leaves the
    BLAS pools as they were."""
    import threading

    from threadpoolctl import threadpool_info

    from hefeat.learn import ridge
    from hefeat.learn.ridge import RidgeBasis

    rng = np.random.default_rng(21)
    n, p, g = 600, 40, 2 * ridge.THREAD_MIN_GENES + 37
    X = rng.normal(size=(n, p))
    Y = X @ rng.normal(size=(p, g)) * rng.uniform(0, 0.3, g) + rng.normal(size=(n, g))
    serial_basis, par_basis = RidgeBasis(X), RidgeBasis(X)
    serial = serial_basis.fit(Y, threads=1)
    names = set()
    block = RidgeBasis._fit_block
    both = threading.Barrier(2, timeout=30)  # two chunks: each waits for the other, so they must run at once

    def spy(self, *a, **k):
        names.add(threading.current_thread().name)
        both.wait()
        return block(self, *a, **k)

    def sizes():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = sizes()
    RidgeBasis._fit_block = spy
    try:
        par = par_basis.fit(Y, threads=2)
    finally:
        RidgeBasis._fit_block = block
    assert len(names) == 2
    assert sizes() == before
    np.testing.assert_array_equal(par.alpha, serial.alpha)
    np.testing.assert_allclose(par.loo_mse, serial.loo_mse, rtol=1e-6)
    np.testing.assert_allclose(par.coef, serial.coef, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(par.intercept, serial.intercept, rtol=1e-6, atol=1e-12)
    assert par_basis.genes_scored == serial_basis.genes_scored == g
    assert par_basis.pairs_scored == serial_basis.pairs_scored


def test_fit_threads_one_per_core_but_one_in_a_worker_process(monkeypatch):
    """A fit splits its genes over every core, in chunks of >= THREAD_MIN_GENES, but not inside a parallel_map
    worker process (HEFEAT_WORKER: the processes already take the cores), and an explicit count wins."""
    from hefeat.learn import emo, ridge, threads

    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    basis = ridge.RidgeBasis(np.random.default_rng(0).normal(size=(20, 3)))
    monkeypatch.delenv("HEFEAT_WORKER", raising=False)
    assert basis._workers(10 * ridge.THREAD_MIN_GENES, None) == 4
    assert basis._workers(3 * ridge.THREAD_MIN_GENES - 1, None) == 2
    assert emo.chunk_threads(10 * ridge.THREAD_MIN_GENES) == 4
    monkeypatch.setenv("HEFEAT_WORKER", "1")
    assert basis._workers(10 * ridge.THREAD_MIN_GENES, None) == 1
    assert emo.chunk_threads(10 * ridge.THREAD_MIN_GENES) == 1
    assert basis._workers(10 * ridge.THREAD_MIN_GENES, 3) == 3
