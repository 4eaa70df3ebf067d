"""The store: catalog, ingest checks, idempotence, crash safety and concurrent workers."""

from __future__ import annotations

import glob
import os
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


def test_an_empty_store_answers_every_view_with_the_columns_code_orders_by(tmp_path):
    """The views of families with no record yet have the columns the code selects and orders by (`indexes` had no
    `created`: asking for neighbours before any index was built failed with DuckDB's binder error)."""
    from hefeat.store.schema import EMPTY_VIEWS

    st = Store.init(tmp_path / "s")
    for view, order in (("indexes", "created DESC"), ("extractions", "created"), ("models", "created"),
                        ("tilings", "created"), ("jobs", "created")):
        assert st.sql(f"SELECT * FROM {view} ORDER BY {order}").empty
    assert set(EMPTY_VIEWS) >= {"indexes", "extractions", "models", "tilings", "jobs"}


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


KILLED_TILER = textwrap.dedent("""
    import glob, os, signal, sys
    import hefeat.slides.run as r
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    real = r.tile_slide
    def tile_then_die(*a, **k):  # SIGKILL inside the first slide begun after two slides' files are in
        out = real(*a, **k)
        if len(glob.glob(os.path.join(sys.argv[1], "tiles", "*", "slide=*.parquet"))) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    r.tile_slide = tile_then_die
    r.run_tiling(Store(sys.argv[1]), TilingParams())
""")


def test_killed_tiling_resumes_without_duplicates(tmp_path, cohort):
    st = _fresh(tmp_path, cohort)
    tid = tiling_id(TilingParams())
    assert subprocess.run([sys.executable, "-c", KILLED_TILER, str(st.root)], timeout=300).returncode == -9
    assert st.tiling_dir(tid) == st.root / "tiles" / st.tiling_dir(tid).name  # the child's glob looks there
    n_files = len(list(st.tiling_dir(tid).glob("slide=*.parquet")))
    n_before = len(st.finished("tiling", tid))  # committed; a file renamed just before the kill is not
    assert 2 <= n_files < 8 and n_files - 1 <= n_before <= n_files
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


def _record(stage: str, key: str, sid: str, **kw) -> str:
    import json

    return json.dumps({"stage": stage, "id": key, "slide_id": sid, "state": "ok", "n_tiles": 10, "seconds": 0.5,
                       "finished_at": "2026-11-21T10:00:00", **kw})


def test_5000_status_files_do_not_break_the_catalog(tmp_path):
    """Thousands of records of mixed vintage plus a partial copy: every command still works, in bounded memory."""
    from click.testing import CliRunner

    from hefeat.cli import main
    from hefeat.store import layout

    st = Store.init(tmp_path / "st")
    for stage, key, n in (("tiling", "tbig", 2500), ("extraction", "ebig", 2500)):
        d = layout.status_dir(st.root, stage, key)
        d.mkdir(parents=True)
        for i in range(n):
            extra = {"reason": None} if i % 2 else {"tiles_per_s": 20.0, "legacy_field": [1, 2]}  # old shapes
            (d / f"X{i:05d}.json").write_text(_record(stage, key, f"X{i:05d}", **extra))
    bad = layout.status_dir(st.root, "tiling", "tbig")
    (bad / "X99998.json").write_text(_record("tiling", "tbig", "X99998")[:40])  # a partial copy
    (bad / "X99999.json").write_text('{"stage": "tiling", "id": "tbig", "slide_id": "X99999", "state": "weird"}')
    n = st.sql("SELECT stage, count(*) n, sum(n_tiles) t FROM status GROUP BY 1 ORDER BY 1")
    assert n["n"].tolist() == [2500, 2500] and n["t"].tolist() == [25000, 25000]
    assert st.sql("SELECT count(*) FROM features_index WHERE extraction_id = 'ebig'").iloc[0, 0] == 2500
    assert st.sql("SELECT count(*) FROM status WHERE info LIKE '%legacy_field%'").iloc[0, 0] == 2500
    r = CliRunner().invoke(main, ["status", "--store", str(st.root), "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output)
    assert sorted(m["file"].rsplit("/", 1)[-1] for m in out["malformed"]) == ["X99998.json", "X99999.json"]
    assert out["stages"]["tiling:tbig"]["ok"] == 2500
    text = CliRunner().invoke(main, ["status", "--store", str(st.root)]).output
    assert "MALFORMED" in text and "X99998.json" in text
    assert not list((st.root / layout.COMPACT).rglob("part-*.parquet"))  # reading wrote nothing
    st.compact()  # a writer's step (`hefeat compact`; the runner after it commits)
    again = Store(st.root)  # a new process-like open reads the compacted table, not 5,000 files
    assert again.sql("SELECT count(*) FROM status").iloc[0, 0] == 5000
    assert again.status_snapshot().reread <= 2  # only the two malformed files are read again


def test_lock_rules_empty_foreign_stale_and_dead(tmp_path):
    """An empty or foreign lock is respected while fresh; stale by age, or by a dead holder on this host."""
    import json
    import socket

    from hefeat.store.locks import STALE_AFTER_S, SlideClaim

    p = tmp_path / "S01.lock"
    p.write_text("")  # created, not yet written: never stolen while fresh
    assert SlideClaim(p).acquire() is False
    old = time.time() - STALE_AFTER_S - 5
    os.utime(p, (old, old))
    c = SlideClaim(p)
    assert c.acquire() is True and json.loads(p.read_text())["pid"] == os.getpid()
    c.release()
    p.write_text(json.dumps({"host": "another-node", "pid": 1}))  # a live job elsewhere
    assert SlideClaim(p).acquire() is False
    os.utime(p, (old, old))  # ... that stopped beating
    assert SlideClaim(p).acquire() is True
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    q = tmp_path / "S02.lock"
    q.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert SlideClaim(q).acquire() is True


def test_busy_slides_are_reported_and_an_all_busy_batch_exits_non_zero(tmp_path, cohort):
    import json

    from click.testing import CliRunner

    from hefeat.cli import main

    st = _fresh(tmp_path, cohort, 2)
    tid = tiling_id(TilingParams())
    for sid in ("S01", "S02"):
        p = st.status_dir("tiling", tid) / f"{sid}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "2026-11-21T09:00:00"}))
    r = CliRunner().invoke(main, ["tile", "--store", str(st.root)])
    assert r.exit_code == 1 and "2 busy" in r.output and "busy S01: claimed by gpu-node-7:4242" in r.output
    s = json.loads(CliRunner().invoke(main, ["status", "--store", str(st.root), "--json"]).output)
    assert sorted(b["slide_id"] for b in s["busy"]) == ["S01", "S02"] and s["stages"][f"tiling:{tid}"]["busy"] == 2
    (st.status_dir("tiling", tid) / "S02.lock").unlink()
    r = CliRunner().invoke(main, ["tile", "--store", str(st.root), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] == 1
