"""`fit genes` streams over gene chunks: any chunk size gives the numbers of one whole-matrix pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hefeat.learn import aggregate, emo, emo_cv
from hefeat.learn import data as data_mod
from hefeat.learn.data import SlideLevelData
from hefeat.learn.emo import GenesParams, fit_genes

PROLIF = ["BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C"]


def _data(seed=0, n_patients=24, n_genes=31, d=6, singles=False) -> SlideLevelData:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], 2)[: 2 * n_patients - 3]  # some patients once
    if singles:  # every sample its own patient
        groups = np.array([f"P{i:02d}" for i in range(len(groups))])
    n = len(groups)
    X = rng.normal(size=(n, d))
    Y = X[:, :2] @ rng.uniform(0, 1.5, (2, n_genes)) + 0.7 * rng.normal(size=(n, n_genes)) + 3
    Y[:, 4] = 1e-3 * rng.normal(size=n)  # fails the variance filter in every fold
    Y[:, 20] = np.abs(Y[:, 20]) - 5  # median < 0: dropped by --median-positive
    ids = np.array([f"S{i:03d}" for i in range(n)])
    genes = [f"G{j:02d}" for j in range(n_genes)]
    genes[6:17] = PROLIF
    return SlideLevelData(ids=ids, groups=groups, slides=[[s] for s in ids], X=X, Y=Y, genes=genes,
                          sites=np.array(["a", "b", "c"] * n)[:n])


def _fit(monkeypatch, chunk_genes: int | None, singles=False, **kw):
    d = _data(singles=singles)
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: d)
    if chunk_genes is not None:  # CHUNK_BYTES counts float64 targets of n samples per chunk
        monkeypatch.setattr(emo, "CHUNK_BYTES", 8 * len(d.ids) * chunk_genes)
    return fit_genes(None, GenesParams(extraction_id="e", **kw), "gen-x")


def _assert_same_fit(got, want, *, rel: float, abs_summary: float, abs_: float, rel_tables: float | None = None):
    """Summary, tables and arrays of two fits equal within the tolerances (coefficients to 1e-6 relative)."""
    assert got.summary == want.summary or all(
        got.summary[k] == pytest.approx(v, rel=rel, abs=abs_summary) for k, v in want.summary.items())
    for name, table in want.tables.items():
        pd.testing.assert_frame_equal(got.tables[name], table, check_exact=False, rtol=rel_tables or rel, atol=abs_)
    for name, arr in want.arrays.items():
        if arr.dtype.kind == "f":
            np.testing.assert_allclose(got.arrays[name], arr, rtol=1e-6 if name == "coef" else rel, atol=abs_)
        else:
            np.testing.assert_array_equal(got.arrays[name], arr)


@pytest.mark.parametrize("kw", [dict(cohort_col="site", permutations=2, median_positive=True),
                                dict(pca=3, permutations=1, split="patient-kfold:4"),
                                dict(permutations=2, median_positive=True)])
def test_gene_chunks_give_the_whole_matrix_numbers(monkeypatch, kw):
    """Chunks of 1 and 4 genes (31 genes: a ragged last chunk) against one chunk of all genes: the same kept
    genes, penalties, metrics, permutation null, out-of-fold table and final heads. Shifting a chunk's
    columns, dropping its last gene, pairing the wrong null or targets with a chunk all fail this."""
    whole = _fit(monkeypatch, None, **kw)
    assert whole.summary["n_genes"] >= 20 and whole.summary["proliferation_genes"] == 11
    for chunk in (1, 4):
        _assert_same_fit(_fit(monkeypatch, chunk, **kw), whole, rel=1e-12, abs_summary=1e-15, abs_=1e-14)


@pytest.mark.parametrize("kw", [dict(cohort_col="site", permutations=2, median_positive=True),
                                dict(permutations=2, median_positive=True)])
def test_gene_chunks_on_threads_give_the_serial_numbers(monkeypatch, kw):
    """Chunks of 4 genes run on two threads at once (each with its own chunk state, BLAS on one thread) against the
    same chunks one after the other: the same kept genes, penalties, metrics, null, out-of-fold table and heads,
    and the chunks did run on two threads. Chunks sharing one CV's chunk state (sums, X'Y, the float32 copy) or
    writing their metrics into each other's genes fail this."""
    import threading

    serial = _fit(monkeypatch, 4, **kw)
    names = set()
    begin = emo_cv.GeneCV.begin_chunk
    pair = threading.Barrier(2, timeout=30)  # 8 chunks: each waits for another to begin, so two always overlap

    def spy(self, Yc, *a):
        names.add(threading.current_thread().name)
        ch = begin(self, Yc, *a)
        pair.wait()
        return ch

    monkeypatch.setattr(emo_cv.GeneCV, "begin_chunk", spy)
    monkeypatch.setattr(emo, "chunk_threads", lambda g: 2)
    threaded = _fit(monkeypatch, 8, **kw)  # 8 genes of memory per chunk, halved for two threads: chunks of 4
    assert len(names) == 2 and threading.main_thread().name not in names
    _assert_same_fit(threaded, serial, rel=1e-12, abs_summary=1e-15, abs_=1e-14)


@pytest.mark.parametrize("singles", [False, True])
def test_streamed_fit_matches_a_direct_computation(monkeypatch, singles):
    """Independent reference for a 1-gene-chunk fit: per fold, heads from fit_ridge_heads on the copied
    training rows; Spearman of patient means by scipy; the permutation null's first permutation likewise.
    singles: every sample its own patient, where the null reuses the observed truth's ranks (its predictions
    re-ordered by the inverse permutation); re-ordering them any other way fails this."""
    from scipy import stats as ss

    from hefeat.learn import stats
    from hefeat.learn.ridge import fit_ridge_heads
    from hefeat.learn.splits import parse_split

    made = []
    gene_ranks = stats.gene_ranks
    monkeypatch.setattr(stats, "gene_ranks", lambda a: made.append(a.shape) or gene_ranks(a))
    res = _fit(monkeypatch, 1, singles=singles, permutations=1)
    assert bool(made) == singles  # the shortcut runs exactly where it applies
    d = _data(singles=singles)
    folds = parse_split("patient-kfold:5", d.ids, d.groups, seed=0)
    keep = np.all([d.Y[f.train].var(0, ddof=1) > 0.01 for f in folds], 0)
    genes = np.flatnonzero(keep)
    oof = np.full(d.Y.shape, np.nan)
    for f in folds:
        oof[f.test] = fit_ridge_heads(d.X[f.train], d.Y[f.train]).predict(d.X[f.test])
    patients = pd.Series(d.groups)

    def rho(pred, true):
        pm = pd.DataFrame(pred).groupby(patients.to_numpy()).mean().to_numpy()
        tm = pd.DataFrame(true).groupby(patients.to_numpy()).mean().to_numpy()
        return np.array([ss.spearmanr(pm[:, j], tm[:, j])[0] for j in range(pm.shape[1])])

    m = res.tables["metrics"]
    assert m["gene"].tolist() == [d.genes[j] for j in genes]
    np.testing.assert_allclose(m["spearman_r"], rho(oof[:, genes], d.Y[:, genes]), rtol=1e-10)
    np.testing.assert_allclose(res.tables["oof_predictions"][m["gene"]].to_numpy(), oof[:, genes], rtol=1e-9)
    perm = np.random.default_rng([0, 1]).permutation(len(d.Y))
    Yp = d.Y[perm]
    po = np.full(d.Y.shape, np.nan)
    for f in folds:
        po[f.test] = fit_ridge_heads(d.X[f.train], Yp[f.train]).predict(d.X[f.test])
    null = rho(po[:, genes], Yp[:, genes])
    np.testing.assert_allclose(res.tables["null"]["spearman_r"], null, rtol=1e-10)


def _rows_path(monkeypatch):
    """Force the per-fold row path of GeneCV (training rows gathered, c = U'y) where the sums path would run."""
    init = emo_cv.GeneCV.__init__

    def rows_init(self, *a, **k):
        init(self, *a, **k)
        self.sums = False

    monkeypatch.setattr(emo_cv.GeneCV, "__init__", rows_init)


@pytest.mark.parametrize("kw", [dict(permutations=2), dict(permutations=1, median_positive=True,
                                                           split="patient-kfold:4")])
def test_sums_path_gives_the_row_path_numbers(monkeypatch, kw):
    """The sums path (each fold's training variances and Xc'Yc from whole-chunk sums minus its test rows', the
    permuted CV read as rows perm of the chunk) against the row path: the same kept genes, penalties, metrics,
    null, out-of-fold table and heads. A wrong centring correction, a permutation applied the wrong way round
    (Xg[perm] for Xg[perm⁻¹]) or the test rows of the unpermuted targets all fail this."""
    sums = _fit(monkeypatch, 4, **kw)
    _rows_path(monkeypatch)
    _assert_same_fit(sums, _fit(monkeypatch, 4, **kw), rel=1e-10, abs_summary=1e-14, abs_=1e-12, rel_tables=1e-9)


def test_variance_filter_at_the_threshold_decides_like_the_row_filter(monkeypatch):
    """A gene whose smallest training variance over the folds is exactly the threshold (as the row filter, numpy's
    var of the fold's rows, computes it): the row filter drops it (var > threshold is false); the sums formula
    lands a few ulps above it for the gene chosen here, so genes within its rounding bound are decided on the rows.
    Without that re-check the gene is kept and the gene set differs from the row path's."""
    from hefeat.learn.splits import parse_split

    d = _data()
    Y = np.asfortranarray(d.Y)
    folds = parse_split("patient-kfold:5", d.ids, d.groups, seed=0)
    rows = np.array([Y[f.train].var(0, ddof=1) for f in folds])  # the row filter's variances
    s1, s2 = Y.sum(0), np.einsum("ij,ij->j", Y, Y)
    sums = []
    for f in folds:  # the sums formula, as _fold_sums computes it
        n_t, Yt = len(f.train), Y[f.test]
        m = (s1 - Yt.sum(0)) / n_t
        sums.append((s2 - np.einsum("ij,ij->j", Yt, Yt) - n_t * m * m) / (n_t - 1))
    sums = np.array(sums)
    low = rows.argmin(0)
    j = next(j for j in range(Y.shape[1]) if sums[low[j], j] > rows[low[j], j] and j not in (4, 20))
    thr = float(rows[low[j], j])
    results = []
    for force_rows in (False, True):
        if force_rows:
            _rows_path(monkeypatch)
        res = _fit(monkeypatch, None, min_variance=thr)
        results.append(res.tables["metrics"]["gene"].tolist())
    assert d.genes[j] not in results[1] and results[0] == results[1]


def test_patient_means_gather_single_rows_and_sum_the_rest_in_order():
    """Patients with one row are gathered, the others summed row after row: the means are those of one
    reduceat over all patients' rows to the bit (so summaries and tables do not move), and equal np.add.at's."""
    rng = np.random.default_rng(3)
    groups = np.array([f"P{i}" for i in rng.integers(0, 40, 60)])
    A = rng.normal(size=(60, 5)) * np.array([1e-3, 1, 10, 1e3, 1e6])
    ug, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    ref = np.add.reduceat(A[order], np.searchsorted(inv[order], np.arange(len(ug))), axis=0) / counts[:, None]
    got = aggregate.patient_means(groups)(A)
    assert (counts > 1).any() and (counts == 1).any()
    np.testing.assert_array_equal(got, ref)
    summed = np.zeros_like(ref)
    np.add.at(summed, inv, A)
    np.testing.assert_allclose(got, summed / counts[:, None], rtol=1e-13)
    assert aggregate.patient_means(groups)(A[:, :0]).shape == (len(ug), 0)
    # rows, columns and a row permutation read in the one gather: the same means as on the copied selection
    big = rng.normal(size=(80, 7))
    rows, cols, perm = rng.permutation(80)[:60], np.array([5, 1, 3]), rng.permutation(80)
    means = aggregate.patient_means(groups, rows)
    np.testing.assert_array_equal(means(big, cols), aggregate.patient_means(groups)(big[np.ix_(rows, cols)]))
    np.testing.assert_array_equal(means(big, cols, perm), aggregate.patient_means(groups)(big[perm][np.ix_(rows, cols)]))
    np.testing.assert_array_equal(means(big)[:, 2], means(big, np.array([2]))[:, 0])


def test_cv_writes_out_of_fold_predictions_in_place():
    """GeneCV.run writes every element of the block it is given (a column slice of the whole out-of-fold array, as
    fit genes passes it, holding other values before): the predictions run() returns without it, NaN where a fold
    dropped the gene, nothing outside the slice touched; and patient means read the strided slice as a copy would."""
    from hefeat.learn.splits import parse_split

    d = _data()
    n, g = d.Y.shape
    folds = parse_split("patient-kfold:5", d.ids, d.groups, seed=0)
    cv = emo_cv.GeneCV(None, GenesParams(extraction_id="e"), d, folds, None)
    Yc = np.asfortranarray(d.Y)
    cv = cv.begin_chunk(Yc)
    ref, kept, alphas = cv.run(Yc)
    whole = np.full((n, g + 5), 7.0)
    block = whole[:, 2:2 + g]
    got, kept2, alphas2 = cv.run(Yc, out=block)
    assert np.shares_memory(got, whole)
    np.testing.assert_array_equal(block, ref)
    np.testing.assert_array_equal(kept2, kept)
    np.testing.assert_array_equal(alphas2, alphas)
    assert np.isnan(ref[:, 4]).all() and not np.isnan(np.delete(ref, 4, axis=1)).any()
    assert (whole[:, :2] == 7).all() and (whole[:, 2 + g:] == 7).all()
    means = aggregate.patient_means(d.groups)
    np.testing.assert_array_equal(means(block), means(np.ascontiguousarray(block)))


def test_kfold_cv_sums_its_folds_test_products_into_x_y_and_a_holdout_does_not():
    """On a k-fold split the folds' test rows partition the samples, so the chunk's X'Y (every fold's training sums
    and the final fit start from it) is the sum of the folds' test-row products, made without an n x p x k product of
    its own, for the observed and for a permuted row order; a holdout split (test rows not a partition) computes it."""
    from hefeat.learn.splits import parse_split

    d = _data()
    n = len(d.ids)
    Yc = np.asfortranarray(d.Y)
    perm = np.random.default_rng(4).permutation(n)
    folds = parse_split("patient-kfold:5", d.ids, d.groups, seed=0)
    cv = emo_cv.GeneCV(None, GenesParams(extraction_id="e"), d, folds, None).begin_chunk(Yc)
    assert cv.partition
    for order in (None, perm):
        parts = cv._test_sums(order)
        key = None if order is None else order.tobytes()
        Y = Yc if order is None else Yc[order]
        np.testing.assert_allclose(cv._chunk[3][key], cv.Xg.T @ Y, rtol=1e-12, atol=1e-12)
        for i, f in enumerate(folds):
            np.testing.assert_allclose(parts[i][2], cv.Xg[f.test].T @ Y[f.test], rtol=1e-12, atol=1e-12)
    held = [type(folds[0])(name="holdout", train=folds[0].train, test=folds[0].test)]
    cv = emo_cv.GeneCV(None, GenesParams(extraction_id="e"), d, held, None).begin_chunk(Yc)
    assert not cv.partition
    cv._test_sums(None)
    assert cv._chunk[3] == {}  # not filled with one fold's rows: _xty computes X'Y of every row when asked
    np.testing.assert_allclose(cv._xty(None), cv.Xg.T @ Yc, rtol=1e-12)


def test_fit_genes_runs_without_numpy_huge_page_advice_and_restores_it(monkeypatch):
    """numpy's huge-page advice is off while fit genes runs its gene chunks (their chunk-sized temporaries would have
    whole 2 MiB pages zeroed on every reuse) and is back as it was afterwards, also after an error inside a chunk."""
    from hefeat.learn import hugepages

    setter = hugepages._setter()
    if setter is None:
        pytest.skip("this numpy has no switch for the huge-page advice")

    def current() -> bool:
        v = setter(True)
        setter(v)
        return bool(v)

    seen = []
    run = emo_cv.GeneCV.run
    monkeypatch.setattr(emo_cv.GeneCV, "run", lambda self, *a, **k: seen.append(current()) or run(self, *a, **k))
    before = setter(True)
    try:
        _fit(monkeypatch, None, permutations=1)
        assert seen and not any(seen)
        assert current() is True
        setter(False)
        _fit(monkeypatch, None)
        assert current() is False  # restored to what it was, not switched on
        setter(True)
        monkeypatch.setattr(emo, "shift_all", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            _fit(monkeypatch, None)
        assert current() is True
    finally:
        setter(before)


def test_fit_genes_chunks_keep_freed_memory_and_the_block_ends_with_the_fit(monkeypatch):
    """Every gene chunk's CV runs inside hefeat.heap's block (chunk-sized temporaries reuse freed memory); the block is
    over when the fit returns, and when a chunk raises."""
    from hefeat import heap

    if not heap.enabled():
        pytest.skip("hefeat.heap does not act here (not glibc)")
    monkeypatch.delenv("HEFEAT_HEAP", raising=False)
    seen = []
    run = emo_cv.GeneCV.run
    monkeypatch.setattr(emo_cv.GeneCV, "run", lambda self, *a, **k: seen.append(heap.active()) or run(self, *a, **k))
    _fit(monkeypatch, None, permutations=1)
    assert seen and all(seen) and not heap.active()
    monkeypatch.setattr(emo, "shift_all", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _fit(monkeypatch, None)
    assert not heap.active()


def test_out_of_fold_table_is_saved_from_the_fits_own_array(monkeypatch, tmp_path):
    """The out-of-fold predictions are made gene-major, so the saved table's float columns are that array's own
    contiguous columns: the Parquet writer lays out no column-major copy of samples x genes (it did for a
    sample-major array). Checked with every gene evaluated (the table is then the array itself)."""
    from hefeat.store import tables

    monkeypatch.setattr(tables, "WIDE", 5)  # the wide-table path a 20,000-gene table takes
    res = _fit(monkeypatch, 4, min_variance=1e-9, permutations=1)
    df = res.tables["oof_predictions"]
    assert res.summary["n_genes"] == 31 and df.shape == (len(_data().ids), 3 + 31)
    seen = []
    real = tables._column_major
    monkeypatch.setattr(tables, "_column_major", lambda block: seen.append(block.flags.f_contiguous) or real(block))
    tables.write_parquet(df, tmp_path / "oof.parquet")
    assert seen == [True]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "oof.parquet"), df)


def test_chunks_reuse_their_threads_buffers(monkeypatch):
    """The chunk-sized arrays each chunk remakes (targets, float32 copy, a null's predictions) are one buffer per
    thread, written chunk after chunk (a ragged last chunk uses its first columns): 8 chunks on one thread make one of
    each, and the fit still equals the whole-matrix pass (test_gene_chunks_give_the_whole_matrix_numbers)."""
    from hefeat.learn import stats

    seen = {"targets": set(), "float32": set(), "null": set()}
    copy, begin, run = stats.transposed_copy, emo_cv.GeneCV.begin_chunk, emo_cv.GeneCV.run

    def spy_copy(a, out=None):
        seen["targets"].add(out.__array_interface__["data"][0])
        return copy(a, out)

    def spy_begin(self, Yc, y32=None):
        seen["float32"].add(y32.__array_interface__["data"][0])
        return begin(self, Yc, y32)

    def spy_run(self, Yc, perm=None, out=None, threads=None):
        if perm is not None:
            seen["null"].add(out.__array_interface__["data"][0])
        return run(self, Yc, perm, out, threads)

    monkeypatch.setattr(stats, "transposed_copy", spy_copy)
    monkeypatch.setattr(emo_cv.GeneCV, "begin_chunk", spy_begin)
    monkeypatch.setattr(emo_cv.GeneCV, "run", spy_run)
    monkeypatch.setattr(emo, "chunk_threads", lambda g: 1)
    res = _fit(monkeypatch, 4, permutations=2)  # 31 genes: 8 chunks, the last of 3
    assert res.summary["n_genes"] >= 20
    assert {k: len(v) for k, v in seen.items()} == {"targets": 1, "float32": 1, "null": 1}


def test_too_few_samples_and_constant_targets_are_one_line_errors(monkeypatch):
    """Fewer than 6 samples, or every gene constant, is a NotEstimable naming why, before any fold is made."""
    from hefeat.learn.registry import NotEstimable

    d = _data()
    small = SlideLevelData(ids=d.ids[:5], groups=d.groups[:5], slides=d.slides[:5], X=d.X[:5], Y=d.Y[:5],
                           genes=d.genes, sites=d.sites[:5])
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: small)
    with pytest.raises(NotEstimable, match="Only 5 samples have both targets and features"):
        fit_genes(None, GenesParams(extraction_id="e", split="patient-kfold:9"), "gen-x")
    flat = SlideLevelData(ids=d.ids, groups=d.groups, slides=d.slides, X=d.X, Y=np.full_like(d.Y, 2.5), genes=d.genes,
                          sites=d.sites)
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: flat)
    with pytest.raises(NotEstimable, match="Every gene is constant"):
        fit_genes(None, GenesParams(extraction_id="e"), "gen-x")
