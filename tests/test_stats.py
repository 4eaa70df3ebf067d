"""Statistics against references: statsmodels corrections, scipy correlations, nulls, the sign test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as ss
from statsmodels.stats.multitest import multipletests

from hefeat.learn import stats


def test_corrections_match_statsmodels():
    p = np.array([0.001, 0.01, 0.02, 0.04, 0.2, 0.5, 0.9])
    for ours, theirs in [("bh", "fdr_bh"), ("bonferroni", "bonferroni"), ("holm", "holm"), ("holm-sidak", "holm-sidak")]:
        np.testing.assert_allclose(stats.correct(p, ours), multipletests(p, method=theirs)[1])


def test_columnwise_correlations_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    b[:, 0] += a[:, 0]
    for j in range(4):
        assert stats.columnwise_pearson(a, b)[j] == pytest.approx(ss.pearsonr(a[:, j], b[:, j])[0])
        assert stats.columnwise_spearman(a, b)[j] == pytest.approx(ss.spearmanr(a[:, j], b[:, j])[0])
    r = stats.columnwise_pearson(a, b)
    np.testing.assert_allclose(stats.r_pvalue(r, 30, "two-sided"), [ss.pearsonr(a[:, j], b[:, j])[1] for j in range(4)])
    assert stats.r_pvalue(np.array([-0.5]), 30)[0] > 0.99  # one-sided: negative r is not evidence
    assert np.isnan(stats.columnwise_pearson(np.ones((5, 1)), b[:5, :1])[0])


def test_matrix_ranks_equal_scipy_rankdata_with_ties_and_nan(monkeypatch):
    """The one-argsort average ranks equal scipy's per-column rankdata: ties averaged, NaN columns all NaN."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 6, size=(40, 50)).astype(float)  # many ties
    a[:, 10:20] = rng.normal(size=(40, 10))
    a[:, 20] = 3.0  # one constant column
    a[5, 30] = np.nan
    np.testing.assert_array_equal(stats._rank(a), ss.rankdata(a, axis=0))
    np.testing.assert_array_equal(stats._rank(a[:, 0]), ss.rankdata(a[:, 0]))
    b = rng.normal(size=(40, 50))
    np.testing.assert_allclose(stats.columnwise_spearman(a[:, :30], b[:, :30]),
                               [ss.spearmanr(a[:, j], b[:, j])[0] for j in range(30)], rtol=1e-12, atol=1e-15)
    whole = stats.columnwise_spearman(a, b), stats.columnwise_pearson(a, b)
    monkeypatch.setattr(stats, "COLUMN_BLOCK", 7)  # in blocks of genes: the same numbers
    np.testing.assert_allclose(stats.columnwise_spearman(a, b), whole[0], rtol=1e-13)
    np.testing.assert_allclose(stats.columnwise_pearson(a, b), whole[1], rtol=1e-13)
    cols = np.array([3, 40, 41, 0, 12, 30])
    np.testing.assert_allclose(stats.columnwise_spearman(a, b, cols=cols), whole[0][cols], rtol=1e-13)


def test_tiled_transposed_copy_equals_the_transpose(monkeypatch):
    """Ragged tiles (shapes not multiples of the tile), strided column slices, float32 kept; and ranks of a block
    wider and taller than a tile still equal scipy's rankdata."""
    monkeypatch.setattr(stats, "TRANSPOSE_BLOCK", 16)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(53, 70))
    for view in (a, a[:, 5:44], a[3:, ::3], a.astype(np.float32), np.asfortranarray(a)[:, :17]):
        t = stats.transposed_copy(view)
        assert t.flags.c_contiguous and t.dtype == view.dtype
        np.testing.assert_array_equal(t, view.T)
    b = rng.integers(0, 9, size=(53, 70)).astype(float)
    np.testing.assert_array_equal(stats._rank(b), ss.rankdata(b, axis=0))


def test_ranks_from_float32_keys_are_exact_without_a_float64_argsort(monkeypatch):
    """_rank sorts 64-bit keys (float32 value, position) instead of argsorting float64: values one float32 apart or
    closer (distinct in float64), exact ties among them, -0.0 and +0.0, values beyond float32's range, infinities and
    subnormals still get scipy's average ranks; no float64 argsort is made."""
    rng = np.random.default_rng(3)
    n = 300
    close = 2 + rng.integers(0, 4, size=(n, 6)) * 1e-12 + rng.integers(0, 3, size=(n, 6)) * 1e-7  # float32 collisions
    odd = rng.choice([1e300, -1e300, 1e-300, -1e-300, 0.0, -0.0, 5e-324, 3.5e38, 3.4e38, -3.5e38, np.inf, -np.inf],
                     size=(n, 6))
    smooth = rng.normal(size=(n, 6)) * 1e-3 + 2
    a = np.hstack([close, odd, smooth, np.round(smooth, 4)])

    def no_argsort(*args, **kwargs):
        raise AssertionError("float64 argsort")

    monkeypatch.setattr(stats.np, "argsort", no_argsort)
    try:
        got = stats._rank(a)
    finally:
        monkeypatch.undo()
    np.testing.assert_array_equal(got, ss.rankdata(a, axis=0))
    np.testing.assert_array_equal(got, stats._rank_argsort(a))
    np.testing.assert_array_equal(stats._rank(np.asfortranarray(a)[:, ::2]), ss.rankdata(a[:, ::2], axis=0))
    b = a.copy()
    b[7, 3] = np.nan
    r = stats._rank(b)
    assert np.isnan(r[:, 3]).all() and not np.isnan(np.delete(r, 3, axis=1)).any()


def test_nan_of_either_sign_anywhere_makes_the_column_nan_and_spearman_sums_are_exact():
    """A NaN is found from the sorted keys (beyond +inf or, with its sign bit set, below -inf) wherever it sits; the
    Spearman r from the ranks' raw sums (exact in float64) equals scipy's on ties, float32 collisions and NaN."""
    rng = np.random.default_rng(11)
    n = 3000
    a = np.hstack([rng.integers(0, 40, size=(n, 4)).astype(float),  # heavy ties, like zero counts
                   2 + rng.integers(0, 3, size=(n, 3)) * 1e-12 + rng.normal(size=(n, 3)) * 1e-5,  # float32 collisions
                   rng.normal(size=(n, 5))])
    b = rng.normal(size=a.shape) + a
    a[0, 8], a[-1, 9], a[17, 10] = np.nan, -np.nan, np.copysign(np.nan, -1.0)
    a[:, 11] = np.inf
    a[5, 11] = -np.inf
    r = stats._rank(a)
    np.testing.assert_array_equal(r, ss.rankdata(a, axis=0))
    assert np.isnan(r[:, 8:11]).all() and not np.isnan(np.delete(r, [8, 9, 10], axis=1)).any()
    with np.errstate(invalid="ignore"):
        want = [ss.spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]
    np.testing.assert_allclose(stats.columnwise_spearman(a, b), want, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(np.isnan(stats.columnwise_spearman(a, b)), np.isnan(want))


def test_a_truth_ranked_once_gives_the_same_metrics_to_the_bit(monkeypatch):
    """gene_ranks equals scipy's rankdata per column (ties, NaN), in blocks on threads; metrics and Spearman r against
    those ranks equal the ones that rank the truth themselves, to the bit, and a truth re-ordered with its prediction
    gives the same r (what `fit genes`' null relies on)."""
    monkeypatch.setattr(stats, "COLUMN_BLOCK", 4)  # 11 columns: three blocks, the last ragged
    rng = np.random.default_rng(3)
    true = np.hstack([rng.integers(0, 5, size=(500, 4)).astype(float), rng.normal(size=(500, 7))])
    pred = rng.normal(size=true.shape) + true
    true[9, 6] = np.nan
    ranks = stats.gene_ranks(true)
    assert ranks.shape == (11, 500) and ranks.flags.c_contiguous
    np.testing.assert_array_equal(ranks.T, ss.rankdata(true, axis=0))
    with np.errstate(invalid="ignore"):
        for name, v in stats.gene_metric_columns(pred, true).items():
            np.testing.assert_array_equal(stats.gene_metric_columns(pred, true, true_ranks=ranks)[name], v)
        want = stats.columnwise_spearman(pred, true)
        np.testing.assert_array_equal(stats.columnwise_spearman(pred, None, true_ranks=ranks), want)
        order = rng.permutation(500)
        np.testing.assert_array_equal(stats.columnwise_spearman(pred[order], true[order]), want)
    with pytest.raises(ValueError, match="no cols"):
        stats.columnwise_spearman(pred, None, np.arange(3), true_ranks=ranks)


def test_four_metrics_share_their_terms_and_equal_the_separate_functions(monkeypatch):
    """gene_metric_columns' block statistic makes the centred targets' and the residuals' sums of squares once
    (7 column sums, not 9) and gives the separate functions' numbers to the bit, NaN and constant columns included."""
    rng = np.random.default_rng(5)
    pred, true = rng.normal(size=(60, 9)), rng.normal(size=(60, 9)) * 3 + 1
    true[:, 2] = 4.0  # constant target: Pearson r and R² undefined
    pred[:, 3] = 1.5  # constant prediction
    pred[7, 5] = np.nan
    want = np.stack([stats._pearson(pred, true), stats._spearman(pred, true),
                     stats.r2_score_cols(pred, true), stats.rmse_cols(pred, true)])
    calls = []
    einsum = np.einsum
    monkeypatch.setattr(stats.np, "einsum", lambda *a, **k: calls.append(1) or einsum(*a, **k))
    got = stats._four(pred, true)
    monkeypatch.undo()
    np.testing.assert_array_equal(got, want)
    assert len(calls) == 7


def test_permutation_null_gives_uniformish_pvalues():
    """On pure-noise targets, refitted predictions give p-values spread over [0, 1]."""
    from hefeat.learn.ridge import fit_ridge_heads

    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(40, 8)), rng.normal(size=(40, 200))

    def fit_predict(Yp):
        out = np.zeros_like(Yp)
        for k in range(4):
            te = np.arange(40) % 4 == k
            out[te] = fit_ridge_heads(X[~te], Yp[~te]).predict(X[te])
        return out

    null = stats.permutation_null(fit_predict, Y, n_perm=3, seed=0)
    assert null.shape == (3, 200)
    p = stats.empirical_p(stats.columnwise_spearman(fit_predict(Y), Y), null)
    assert 0.3 < np.mean(p) < 0.7 and np.mean(p < 0.05) < 0.12


def test_sign_test_matches_stnet_example():
    """20 of 23 patients with r > 0: P(X >= 20 | n=23, p=0.5), computed independently."""
    from math import comb

    ref = sum(comb(23, k) for k in range(20, 24)) / 2**23
    assert stats.sign_test(20, 23) == pytest.approx(ref)
    assert ref == 2048 / 2**23  # 1771 + 253 + 23 + 1 outcomes


def test_bootstrap_auc_ci_and_gene_set_score():
    import pandas as pd

    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(50), np.ones(50)]
    s = y + rng.normal(0, 1, 100)
    res = stats.auc_with_ci(y, s, n_boot=300)
    assert res["ci_low"] < res["auc"] < res["ci_high"] and 0.7 < res["auc"] < 0.9
    r = pd.Series(rng.normal(0, 0.1, 500), index=[f"g{i}" for i in range(500)])
    r.iloc[:10] += 0.5
    out = stats.gene_set_score(r, [f"g{i}" for i in range(10)], n_random=2000)
    assert out["p_value"] < 0.01 and out["mean_r"] > out["random_mean"]


def test_column_statistics_in_threads_equal_one_thread(monkeypatch):
    """Blocks of columns computed on several threads give the one-thread result to the bit, in column order (a
    block returned out of order or computed on the wrong columns fails), and match scipy per column."""
    from scipy import stats as ss

    rng = np.random.default_rng(4)
    a = np.round(rng.normal(size=(40, 3 * stats.COLUMN_BLOCK + 17)), 1)  # ties
    b = a + rng.normal(size=a.shape)
    cols = rng.permutation(a.shape[1])[:2 * stats.COLUMN_BLOCK + 5]
    monkeypatch.setattr(stats, "COLUMN_THREADS", 1)
    one = stats.gene_metric_columns(a, b), stats.columnwise_spearman(a, b, cols)
    monkeypatch.setattr(stats, "COLUMN_THREADS", 3)
    many = stats.gene_metric_columns(a, b), stats.columnwise_spearman(a, b, cols)
    for k in one[0]:
        np.testing.assert_array_equal(many[0][k], one[0][k])
    np.testing.assert_array_equal(many[1], one[1])
    for j in (0, stats.COLUMN_BLOCK + 3, a.shape[1] - 1):
        assert many[0]["spearman_r"][j] == pytest.approx(ss.spearmanr(a[:, j], b[:, j])[0], rel=1e-12)
        assert many[0]["pearson_r"][j] == pytest.approx(ss.pearsonr(a[:, j], b[:, j])[0], rel=1e-12)
    assert many[1][7] == pytest.approx(ss.spearmanr(a[:, cols[7]], b[:, cols[7]])[0], rel=1e-12)


def test_bootstrap_auc_equals_scikit_learns_per_resample():
    """auc_with_ci's resamples use the rank (Mann-Whitney) AUC: equal to roc_auc_score on ties, string labels and
    resamples with one class (skipped); the CI equals the one from roc_auc_score per resample."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    y = np.where(rng.random(60) < 0.3, "pos", "neg")  # "pos" > "neg": the positive class, as scikit-learn takes it
    score = np.round(rng.normal(size=60) + (y == "pos"), 1)  # ties
    assert stats.binary_auc(y == "pos", score) == pytest.approx(roc_auc_score(y, score), abs=1e-14)
    assert stats.binary_auc(np.zeros(5, bool), np.arange(5.0)) is None
    got = stats.auc_with_ci(y, score, n_boot=300, seed=2)

    def ref_stat(idx):
        return roc_auc_score(y[idx], score[idx]) if len(np.unique(y[idx])) == 2 else None

    lo, hi = stats.bootstrap_ci(ref_stat, len(y), n_boot=300, seed=2)
    assert got["auc"] == roc_auc_score(y, score)
    assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(hi, abs=1e-12)
    small = stats.auc_with_ci(y[:8], score[:8], n_boot=200, seed=1)  # many one-class resamples
    lo, hi = stats.bootstrap_ci(ref_stat, 8, n_boot=200, seed=1)
    assert small["ci_low"] == pytest.approx(lo, abs=1e-12) and small["ci_high"] == pytest.approx(hi, abs=1e-12)
