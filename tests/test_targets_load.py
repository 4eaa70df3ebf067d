"""Stage-2 targets loaded in place on every core: the same bits as the copying transform, any block split."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.learn import data as data_mod
from hefeat.learn.data import TRANSFORMS, transform_inplace, transform_values


@pytest.mark.parametrize("how", TRANSFORMS)
def test_in_place_transform_gives_the_copying_transforms_bits(how):
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (5, 37), (64, 129)]:  # SIMD tails of every length
        v = np.concatenate([rng.gamma(0.5, 40, size=shape).ravel(), [0.0, -0.0, 1e-300, 3e38, -0.5, np.nan]])
        v = v.astype(np.float32).astype(np.float64)  # targets are stored as float32
        want = transform_values(v.copy(), how)
        got = v.copy()
        transform_inplace(got, how)
        assert np.array_equal(want.view(np.int64), got.view(np.int64)), (how, shape)
    with pytest.raises(HefeatError, match="Unknown transform"):
        transform_inplace(np.zeros(3), "sqrt")


def test_blocks_run_on_threads_and_cover_every_row(monkeypatch):
    monkeypatch.setattr(data_mod, "ROW_BLOCK", 3)
    monkeypatch.setattr("hefeat.learn.threads.available_cores", lambda: 2)
    seen, names = [], set()

    def fn(a, b):
        names.add(threading.current_thread().name)
        seen.append((a, b))
        return b - a

    assert data_mod._blocks(10, fn) == [3, 3, 3, 1]
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert threading.main_thread().name not in names  # a thread pool, not the caller's loop


@pytest.fixture
def targets_store(tmp_path, cohort):
    """A store over the 8-slide cohort with its expression ingested genes in reverse order (read back sorted)."""
    import glob

    from hefeat.slides.run import ingest_slides
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_clinical, ingest_expression

    st = Store.init(tmp_path / "st")
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff"))))
    expr = pd.read_parquet(cohort / "expression.parquet")
    genes = [c for c in expr.columns if c != "sample_id"]
    expr = expr[["sample_id", *sorted(genes, reverse=True)]]
    expr.to_parquet(tmp_path / "rev.parquet", index=False)
    ingest_expression(st, tmp_path / "rev.parquet")
    slides = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])
    pat = {s: f"P{i // 2 + 1}" for i, s in enumerate(slides)}  # two slides per patient
    pd.DataFrame({"slide_id": slides, "patient_id": [pat[s] for s in slides]}).to_csv(tmp_path / "c.csv", index=False)
    ingest_clinical(st, tmp_path / "c.csv")
    return st, slides


@pytest.mark.parametrize("how", TRANSFORMS)
@pytest.mark.parametrize("subset", [False, True])
def test_targets_equal_the_copying_path_bit_for_bit(targets_store, monkeypatch, how, subset):
    """Blocks of 3 rows on 2 threads, genes stored out of order, some samples without features (rows
    gathered) or all of them (rows read as a view): the float64 targets are the copying version's bits."""
    from hefeat.learn.data import expression_table, sample_targets

    st, slides = targets_store
    used = slides[1:] if subset else slides
    monkeypatch.setattr(data_mod, "finished_slides", lambda store, eid: used)
    monkeypatch.setattr(data_mod, "ROW_BLOCK", 3)
    monkeypatch.setattr("hefeat.learn.threads.available_cores", lambda: 2)
    wide = expression_table(st)  # float64 of the stored float32, genes sorted
    smap = st.sql("SELECT sample_id, slide_id FROM samples WHERE dataset = 'expression'")
    d = sample_targets(st, "e", transform=how)
    assert d.genes == sorted(d.genes) == list(wide.columns)
    want = transform_values(wide.loc[d.ids].to_numpy(), how)
    assert sorted(d.ids) == sorted(smap[smap["slide_id"].isin(used)]["sample_id"])
    assert d.Y.dtype == np.float64 and np.array_equal(d.Y.view(np.int64), want.view(np.int64))
    p = sample_targets(st, "e", transform=how, level="patient")
    by_patient = pd.DataFrame(transform_values(wide.to_numpy(), how), index=wide.index)
    pid = st.sql("SELECT s.sample_id, sl.patient_id FROM samples s JOIN slides sl USING (slide_id) "
                 "WHERE s.dataset = 'expression'").set_index("sample_id")["patient_id"]
    keep = smap[smap["slide_id"].isin(used)]["sample_id"]
    ref = by_patient.loc[keep].groupby(pid.loc[keep].to_numpy()).mean().loc[p.ids].to_numpy()
    np.testing.assert_allclose(p.Y, ref, rtol=1e-13, atol=0)
    with pytest.raises(HefeatError, match="Unknown transform"):
        sample_targets(st, "e", transform="sqrt")


def test_targets_read_as_they_are_and_bad_values_named(targets_store, monkeypatch, tmp_path):
    """Every sample and the genes in their stored order: the matrix read (float64, transformed batch by batch in
    batches of 3 rows) is the targets array itself, with the copying transform's bits. A missing value, or a value the
    log transform cannot take (<= -1), is a one-line error naming the gene, under the transform that meets it."""
    from hefeat.learn.data import expression_table, sample_targets
    from hefeat.store import expression
    from hefeat.store.ingest import ingest_expression

    st, slides = targets_store
    monkeypatch.setattr(data_mod, "finished_slides", lambda store, eid: slides)
    monkeypatch.setattr(expression, "READ_ROWS", 3)
    genes = st.sql("SELECT gene FROM expression_genes WHERE dataset = 'expression' ORDER BY pos")["gene"].tolist()
    d = sample_targets(st, "e", genes=genes)
    wide = expression_table(st, genes=genes)
    assert np.array_equal(d.Y.view(np.int64), transform_values(wide.loc[d.ids].to_numpy(), "log1p").view(np.int64))
    expr = wide.reset_index()
    expr.loc[2, genes[4]] = -1.5  # log1p: NaN
    expr.loc[5, genes[7]] = np.nan  # missing
    expr.to_parquet(tmp_path / "bad.parquet", index=False)
    ingest_expression(st, tmp_path / "bad.parquet", dataset="bad")
    with pytest.raises(HefeatError, match=rf"missing \(NaN\) or invalid under log1p .* 2 genes: .*{genes[4]}"):
        sample_targets(st, "e", dataset="bad")
    with pytest.raises(HefeatError, match=rf"under none .* 1 genes: {genes[7]};"):
        sample_targets(st, "e", dataset="bad", transform="none")  # -1.5 is a fine value untransformed
