"""The store: catalog, ingest checks, idempotence, crash safety and concurrent workers."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.slides.run import ingest_slides, run_tiling, tiling_id
from hefeat.slides.synth import blank_slide
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
from hefeat.store.ingest import ingest_clinical, ingest_expression, ingest_spots


def _fresh(tmp_path, cohort, n=None):
    st = Store.init(tmp_path / "st")
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:n]
    ingest_slides(st, paths)
    return st


def test_store_path_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(HefeatError, match="is a file"):
        Store.init(f)
    with pytest.raises(HefeatError, match="No store"):
        Store(tmp_path / "none").require()


def test_tiles_view_joins_across_slides_and_tilings(tiled):
    st, tid, sid = tiled
    n = st.sql("SELECT count(*) n, count(DISTINCT slide_id) s, count(DISTINCT tiling_id) t FROM tiles").iloc[0]
    assert n.s == 8 and n.t == 2
    per = st.sql(f"SELECT slide_id, count(*) n FROM tiles WHERE tiling_id = '{tid}' GROUP BY 1")
    ok = st.sql(f"SELECT slide_id, n_tiles FROM status WHERE id = '{tid}' AND state = 'ok'")
    assert per.merge(ok, on="slide_id").eval("n == n_tiles").all()
    spots = st.sql(f"SELECT count(*) FROM tiles WHERE tiling_id = '{sid}'").iloc[0, 0]
    assert spots == st.sql("SELECT count(*) FROM spots").iloc[0, 0]


def test_ingest_is_idempotent_and_refuses_conflicts(tmp_path, cohort):
    st = _fresh(tmp_path, cohort, 2)
    rep = ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2])
    assert rep.added == [] and len(rep.unchanged) == 2
    other = tmp_path / "S01.tiff"
    blank_slide(other)
    with pytest.raises(HefeatError, match="different content"):
        ingest_slides(st, [other])
    assert len(st.slides()) == 2


def test_expression_checks(tmp_path, cohort):
    st = _fresh(tmp_path, cohort, 4)
    expr = pd.read_parquet(cohort / "expression.parquet")
    with pytest.raises(HefeatError, match="match no slide"):
        ingest_expression(st, cohort / "expression.parquet")
    assert st.sql("SELECT count(*) FROM expression").iloc[0, 0] == 0
    rep = ingest_expression(st, cohort / "expression.parquet", allow_unmatched=True)
    assert len(rep.unmatched) == 4
    dup = expr.head(4).copy()
    dup.to_csv(tmp_path / "dup.csv", index=False)
    with open(tmp_path / "dup.csv") as f:
        header, *rows = f.read().splitlines()
    (tmp_path / "dupgene.csv").write_text("\n".join([header + "," + header.split(",")[1]] + [r + ",1" for r in rows]))
    with pytest.raises(HefeatError, match="duplicate columns"):
        ingest_expression(st, tmp_path / "dupgene.csv", dataset="d2")
    pd.concat([dup, dup.head(1)]).to_parquet(tmp_path / "dupsample.parquet")
    with pytest.raises(HefeatError, match="duplicate samples"):
        ingest_expression(st, tmp_path / "dupsample.parquet", dataset="d3")
    # Long form works too, and earlier data is intact.
    long = dup.melt(id_vars="sample_id", var_name="gene", value_name="value")
    long.to_csv(tmp_path / "long.csv", index=False)
    ingest_expression(st, tmp_path / "long.csv", dataset="long")
    assert st.sql("SELECT count(*) FROM expression WHERE dataset='long'").iloc[0, 0] == len(long)
    assert st.sql("SELECT count(*) FROM expression WHERE dataset='expression'").iloc[0, 0] == expr.shape[0] * (expr.shape[1] - 1)


def test_clinical_links_patients_and_spots_check(tmp_path, cohort):
    st = _fresh(tmp_path, cohort)
    ingest_clinical(st, cohort / "clinical.csv")
    clin = pd.read_csv(cohort / "clinical.csv")
    got = st.sql("SELECT slide_id, patient_id, site FROM slides ORDER BY 1")
    assert got["patient_id"].tolist() == clin.sort_values("slide_id")["patient_id"].tolist()
    sp = pd.read_parquet(cohort / "spots.parquet")
    sp.loc[0, "slide_id"] = "NOPE"
    sp.to_parquet(tmp_path / "sp.parquet")
    with pytest.raises(HefeatError, match="NOPE"):
        ingest_spots(st, tmp_path / "sp.parquet")


def test_tiling_twice_does_no_work_and_new_params_new_id(tmp_path, cohort):
    st = _fresh(tmp_path, cohort, 3)
    a = run_tiling(st, TilingParams())
    b = run_tiling(st, TilingParams())
    assert len(a.ok) == 3 and b.ok == [] and len(b.done) == 3
    c = run_tiling(st, TilingParams(size=128))
    assert c.extra["tiling_id"] != a.extra["tiling_id"] and len(c.ok) == 3
    assert st.tiles_path(a.extra["tiling_id"], "S01").exists()


def test_no_tissue_slide_is_skipped_and_batch_goes_on(tmp_path, cohort):
    st = _fresh(tmp_path, cohort, 2)
    ingest_slides(st, [blank_slide(tmp_path / "BLANK.tiff")])
    s = run_tiling(st, TilingParams())
    assert "BLANK" in s.skipped and len(s.ok) == 2
    again = run_tiling(st, TilingParams())
    assert "BLANK" in again.done
    row = st.sql("SELECT state, reason FROM status WHERE slide_id = 'BLANK'").iloc[0]
    assert row.state == "skipped" and "no tissue" in row.reason


def test_corrupt_slide_fails_alone(tmp_path, cohort):
    import shutil

    for sid in ("S01", "S02"):
        shutil.copy(cohort / "slides" / f"{sid}.tiff", tmp_path / f"{sid}.tiff")
    st = Store.init(tmp_path / "st")
    ingest_slides(st, [tmp_path / "S01.tiff", tmp_path / "S02.tiff"])
    path = tmp_path / "S01.tiff"
    data = path.read_bytes()
    with open(path, "wb") as f:  # the file changes after ingest: recorded as failed, others go on
        f.write(data[: len(data) // 2])
    s = run_tiling(st, TilingParams())
    assert list(s.failed) == ["S01"] and s.ok == ["S02"]
    assert "changed since ingest" in s.failed["S01"]
    with pytest.raises(HefeatError, match="S01"):
        run_tiling(st, TilingParams(size=128), fail_fast=True)


SLOW_TILER = textwrap.dedent("""
    import sys, time
    import hefeat.slides.run as r
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    real = r.tile_slide
    def slow(*a, **k):
        time.sleep(0.4)
        return real(*a, **k)
    r.tile_slide = slow
    r.run_tiling(Store(sys.argv[1]), TilingParams(), shard=sys.argv[2] if len(sys.argv) > 2 else None)
""")


def _tile_table(st, tid):
    return st.sql(f"SELECT slide_id, tile_id, x, y, sharpness FROM tiles WHERE tiling_id = '{tid}' ORDER BY 1, 2")


def test_killed_tiling_resumes_without_duplicates(tmp_path, cohort):
    st = _fresh(tmp_path, cohort)
    tid = tiling_id(TilingParams())
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TILER, str(st.root)])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(st.tiling_dir(tid).glob("slide=*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(st.tiling_dir(tid).glob("slide=*.parquet")))
    assert 2 <= n_before < 8
    s = run_tiling(st, TilingParams())
    assert len(s.done) == n_before and len(s.ok) == 8 - n_before
    ref = _fresh(tmp_path / "ref", cohort)
    run_tiling(ref, TilingParams())
    pd.testing.assert_frame_equal(_tile_table(st, tid), _tile_table(ref, tid))
    leftovers = [p for p in st.tiling_dir(tid).iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(".tmp-" in p.name for p in leftovers)


def test_two_processes_tile_one_store_at_once(tmp_path, cohort):
    st = _fresh(tmp_path, cohort)
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_TILER, str(st.root), f"{i}/2"]) for i in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    tid = tiling_id(TilingParams())
    ok = st.sql(f"SELECT slide_id FROM status WHERE id = '{tid}' AND state = 'ok'")
    assert sorted(ok["slide_id"]) == [f"S0{i}" for i in range(1, 9)]
    assert not list(st.status_dir("tiling", tid).glob("*.lock"))
    assert os.path.exists(st.catalog_path)
