"""The commit protocol under fault injection: a kill or a full disk at every step is repaired by a re-run.

Each kill test runs tiling or extraction in a child process with one fault point armed
(HEFEAT_FAULT, see hefeat.store.faults), so the process dies exactly at that step of the second
slide; a full disk is injected in-process. The re-run must then finish every slide, the store must
show exactly the slides whose commit records exist, and the result must equal an uninterrupted run.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store import faults, layout
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

PARAMS = TilingParams(max_tiles=12)
ENC = dict(encoder="resnet18", weights="none", layer="layer1", precision="fp32", dtype="float32")
OPT = dict(batch_size=8, workers=0)
SLIDES = ["S01", "S02", "S03"]

TILER = textwrap.dedent("""
    import sys
    from hefeat.slides.run import run_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    run_tiling(Store(sys.argv[1]), TilingParams(max_tiles=12))
""")
EXTRACTOR = textwrap.dedent("""
    import sys
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.store.catalog import Store
    run_extraction(Store(sys.argv[1]), encoder="resnet18", weights="none", layer="layer1", precision="fp32",
                   dtype="float32", options=ExtractOptions(batch_size=8, workers=0))
""")


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    faults.disarm()


@pytest.fixture(scope="module")
def template(tmp_path_factory, cohort):
    """Ingested 3-slide stores (not tiled, and tiled) and, separately, the reference tiles and features."""
    root = tmp_path_factory.mktemp("commit")
    st = Store.init(root / "template")
    ingest_slides(st, [cohort / "slides" / f"{s}.tiff" for s in SLIDES])
    shutil.copytree(root / "template", root / "ref")
    ref = Store(root / "ref")
    tid = run_tiling(ref, PARAMS).extra["tiling_id"]
    shutil.copytree(root / "ref", root / "tiled")
    eid = run_extraction(ref, options=ExtractOptions(**OPT), **ENC).extra["extraction_id"]
    feats = {s: read_features(ref.features_path(eid, s)) for s in SLIDES}
    return root / "template", tid, eid, _tiles(ref, tid), feats


def _tiles(st: Store, tid: str) -> pd.DataFrame:
    return st.sql("SELECT slide_id, tile_id, x, y, sharpness FROM tiles ORDER BY 1, 2", tiling=tid)


def _copy(template, tmp_path, *, tiled: bool = False) -> Store:
    root = template[0]
    dst = tmp_path / "st"
    shutil.copytree(root.with_name("tiled") if tiled else root, dst)
    return Store(dst)


def _child(script: str, st: Store, fault: str) -> int:
    env = {**os.environ, "HEFEAT_FAULT": fault, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", script, str(st.root)], env=env, capture_output=True, timeout=300).returncode


def _visible_equals_records(st: Store, stage: str, key: str) -> None:
    """The store shows a slide exactly when its commit record says ok."""
    ok = set(st.finished(stage, key)["slide_id"])
    if stage == "tiling":
        shown = set(st.sql("SELECT DISTINCT slide_id FROM tiles", tiling=key)["slide_id"])
    else:
        shown = set(st.sql("SELECT slide_id FROM features_index WHERE extraction_id = ?", [key])["slide_id"])
        # What the feature readers see (all slides, and slide by slide) follows the records too.
        from hefeat.store.features import slide_table

        assert set(slide_table(st, key).slide_ids) == ok
        for sid in SLIDES:
            if sid in ok:
                assert slide_table(st, key, [sid]).slide_ids == [sid]
            else:
                with pytest.raises(HefeatError, match="has no features"):
                    slide_table(st, key, [sid])
    assert shown == ok


@pytest.mark.parametrize("fault", ["tiles.rename:kill@2", "tiles.renamed:kill@2", "record.rename:kill@2",
                                   "record.renamed:kill@2"])
def test_tiling_killed_at_each_commit_step_is_repaired(template, tmp_path, fault):
    _, tid, _, ref_tiles, _ = template
    st = _copy(template, tmp_path)
    assert _child(TILER, st, fault) == -9
    # Killed between rename and record: the renamed file is there but nobody sees it.
    _visible_equals_records(st, "tiling", tid)
    committed = set(st.finished("tiling", tid)["slide_id"])
    assert "S01" in committed and "S03" not in committed
    if fault.startswith("tiles.renamed"):
        assert st.tiles_path(tid, "S02").exists() and "S02" not in committed
    s = run_tiling(st, PARAMS)
    assert sorted(s.done + s.ok) == SLIDES and s.failed == {} and s.busy == {}
    assert set(s.ok) == set(SLIDES) - committed
    pd.testing.assert_frame_equal(_tiles(st, tid), ref_tiles)
    _visible_equals_records(st, "tiling", tid)
    assert not list(st.tiling_dir(tid).glob(".*tmp-*")) and not list(st.status_dir("tiling", tid).glob("*.lock"))


@pytest.mark.parametrize("point", ["tiles.write", "tiles.fsync", "record.write", "record.fsync"])
def test_tiling_disk_full_at_each_write_is_one_line_and_repaired(template, tmp_path, point):
    _, tid, _, ref_tiles, _ = template
    st = _copy(template, tmp_path)
    faults.arm(point, "enospc", 2)
    with pytest.raises(HefeatError, match="disk is full") as e:
        run_tiling(st, PARAMS)
    assert "\n" not in str(e.value)
    _visible_equals_records(st, "tiling", tid)
    assert "S01" in set(st.finished("tiling", tid)["slide_id"])
    s = run_tiling(st, PARAMS)
    assert sorted(s.done + s.ok) == SLIDES and s.failed == {}
    pd.testing.assert_frame_equal(_tiles(st, tid), ref_tiles)


@pytest.mark.parametrize("fault", ["features.rename:kill@2", "features.renamed:kill@2", "record.rename:kill@2",
                                   "record.renamed:kill@2"])
def test_extraction_killed_at_each_commit_step_is_repaired(template, tmp_path, fault):
    _, tid, eid, _, ref = template
    st = _copy(template, tmp_path, tiled=True)
    assert _child(EXTRACTOR, st, fault) == -9
    _visible_equals_records(st, "extraction", eid)
    committed = set(st.finished("extraction", eid)["slide_id"])
    assert len(committed) == (2 if fault.startswith("record.renamed") else 1)
    if fault.startswith("features.renamed"):
        assert len(glob.glob(str(st.extraction_dir(eid) / "*.h5"))) == 2  # one renamed but not committed
    s = run_extraction(st, options=ExtractOptions(**OPT), **ENC)
    assert s.extra["extraction_id"] == eid and s.failed == {} and s.busy == {}
    assert set(s.ok) == set(SLIDES) - committed and sorted(s.done + s.ok) == SLIDES
    for sid in SLIDES:
        assert read_features(st.features_path(eid, sid)).tobytes() == ref[sid].tobytes(), sid
    _visible_equals_records(st, "extraction", eid)
    assert not list(st.extraction_dir(eid).glob(".*tmp-*"))


@pytest.mark.parametrize("point", ["features.write", "features.rename", "record.write"])
def test_extraction_disk_full_at_each_write_is_one_line_and_repaired(template, tmp_path, point):
    _, tid, eid, _, ref = template
    st = _copy(template, tmp_path, tiled=True)
    faults.arm(point, "enospc", 2)  # the second write of that kind: inside the first or the second slide
    with pytest.raises(HefeatError, match="disk is full") as e:
        run_extraction(st, options=ExtractOptions(**OPT), **ENC)
    assert "\n" not in str(e.value)
    _visible_equals_records(st, "extraction", eid)
    assert not list(st.status_dir("extraction", eid).glob("*.lock"))
    s = run_extraction(st, options=ExtractOptions(**OPT), **ENC)
    assert sorted(s.done + s.ok) == SLIDES and s.failed == {}
    for sid in SLIDES:
        assert read_features(st.features_path(eid, sid)).tobytes() == ref[sid].tobytes(), sid


def test_writer_that_raises_fails_the_run_within_seconds(template, tmp_path):
    """A writer thread that dies while the reader keeps producing never leaves the run blocked on a full queue."""
    _, tid, eid, _, _ = template
    st = _copy(template, tmp_path, tiled=True)
    faults.arm("features.write", "raise", 1)
    t = time.perf_counter()
    with pytest.raises(HefeatError, match="Writing features failed: RuntimeError: fault injected at features.write"):
        run_extraction(st, options=ExtractOptions(batch_size=1, workers=0), **ENC)  # 36 batches >> queue of 8
    assert time.perf_counter() - t < 60
    assert not list(st.status_dir("extraction", eid).glob("*.lock"))
    assert not list(st.extraction_dir(eid).glob(".*tmp-*"))
    assert st.finished("extraction", eid).empty


def test_output_without_record_or_with_wrong_size_is_not_done(template, tmp_path):
    """'Done' is decided in one place: an ok record whose output is in place with the recorded size."""
    from hefeat.store.commit import is_done

    _, tid, *_ = template
    st = _copy(template, tmp_path, tiled=True)
    assert is_done(st, "tiling", tid, "S01")
    p = st.tiles_path(tid, "S01")
    p.write_bytes(p.read_bytes() + b"x")  # another size than the record says
    assert not is_done(st, "tiling", tid, "S01")
    st.status_path("tiling", tid, "S02").unlink()  # output without its record
    assert not is_done(st, "tiling", tid, "S02")
    st.status_path("tiling", tid, "S03").write_text('{"stage": "tiling", "id"')  # a partial copy
    assert not is_done(st, "tiling", tid, "S03")
    s = run_tiling(st, PARAMS)
    assert sorted(s.ok) == SLIDES


def test_two_unsharded_extract_processes_finish_every_slide_exactly_once(template, tmp_path):
    """Slides are claimed one at a time, so two workers without --shard share the cohort."""
    _, tid, eid, _, ref = template
    st = _copy(template, tmp_path, tiled=True)
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import json, os, sys, time
        import hefeat.extract.pipeline as p
        from hefeat.store.catalog import Store
        real = p.embed_batch
        def gated(*a, **k):  # both workers start computing together, then go batch by batch
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
            time.sleep(0.05)
            return real(*a, **k)
        p.embed_batch = gated
        s = p.run_extraction(Store(sys.argv[1]), encoder="resnet18", weights="none", layer="layer1",
                             precision="fp32", dtype="float32", options=p.ExtractOptions(batch_size=4, workers=0))
        print(json.dumps({{"ok": s.ok, "busy": sorted(s.busy), "done": s.done}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(st.root)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = time.time() + 120
    while len(list(st.status_dir("extraction", eid).glob("*.lock"))) < 2 and time.time() < deadline:
        time.sleep(0.02)  # each worker holds a claim before either computes
    go.write_text("go")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    import json

    a, b = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert a["ok"] and b["ok"], (a, b)  # both worked
    assert not set(a["ok"]) & set(b["ok"])  # no slide twice
    assert sorted(a["ok"] + b["ok"]) == SLIDES  # every slide once
    for sid in SLIDES:
        assert read_features(st.features_path(eid, sid)).tobytes() == ref[sid].tobytes()
    pids = st.sql("SELECT slide_id, pid FROM status WHERE stage = 'extraction'")
    assert pids["pid"].nunique() == 2


def test_thread_unique_temp_names(tmp_path):
    """Threads writing the same file at once never share a temporary name (the explorer server is threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    from hefeat.store.atomic import read_json, write_json

    target = tmp_path / "x.json"

    def write(i: int) -> None:
        for _ in range(30):
            write_json(target, {"writer": i, "pad": "x" * 5000})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert read_json(target)["writer"] in range(8)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_layout_is_the_only_path_formatter():
    """No module outside hefeat/store formats a store folder name itself."""
    import hefeat

    pkg = os.path.dirname(hefeat.__file__)
    offenders = []
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        if os.sep + "store" + os.sep in path or os.sep + "formats" + os.sep in path:
            continue  # formats/ reads published layouts (Space Ranger outs/, HEST), not the store's files
        text = Path(path).read_text()
        for needle in ('root / "', '"slide=', '"tiling=', '"extraction=', '"model=', '"umap=', '/ "queries"'):
            if needle in text:
                offenders.append((os.path.relpath(path, pkg), needle))
    assert offenders == []
    assert layout.tiles_path(Path("/s"), "t1", "S01").as_posix() == "/s/tiles/tiling=t1/slide=S01.parquet"
    assert np.all([layout.parse_status_dir(layout.status_dir(Path("/s"), "tiling", "t1").name) == ("tiling", "t1")])


REAL_FULL_DISK = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from hefeat.errors import HefeatError
    from hefeat.slides.run import run_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    template, mnt, leave = sys.argv[1], sys.argv[2], int(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", mnt], check=True)
    shutil.copytree(template, mnt + "/st")
    st = Store(mnt + "/st")
    free = shutil.disk_usage(mnt).free
    subprocess.run(["fallocate", "-l", str(free - leave), mnt + "/filler"], check=True)
    out = {}
    try:
        s = run_tiling(st, TilingParams(max_tiles=12))
        out["first"] = {"ok": s.ok, "failed": s.failed}
    except HefeatError as e:
        out["first"] = {"error": str(e)}
    except OSError as e:
        out["first"] = {"oserror": str(e)}
    os.unlink(mnt + "/filler")
    s = run_tiling(st, TilingParams(max_tiles=12))
    out["second"] = {"ok": s.ok, "done": s.done, "failed": s.failed, "tiling_id": s.extra["tiling_id"]}
    tid = s.extra["tiling_id"]
    out["tiles"] = st.sql("SELECT slide_id, tile_id, x, y, sharpness FROM tiles ORDER BY 1, 2", tiling=tid).to_json()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("leave", [8_000, 24_000])
def test_tiling_on_a_really_full_disk_is_repaired(template, tmp_path, leave):
    """A real ENOSPC (tmpfs filled up to a few KB) mid-tiling: one-line error, then a re-run with space repairs it."""
    import json

    if shutil.which("unshare") is None or shutil.which("fallocate") is None:
        pytest.skip("unshare/fallocate not available")
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("user/mount namespaces not available here")
    _, tid, _, ref_tiles, _ = template
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", REAL_FULL_DISK,
                        str(template[0]), str(mnt), str(leave)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    first = out["first"]
    assert "ok" not in first or len(first["ok"]) < len(SLIDES), first  # the disk did fill up
    if "error" in first:
        assert "disk is full" in first["error"] and "\n" not in first["error"]
    if "oserror" in first:  # before any slide started (the tiling's own parameters file): a plain ENOSPC
        assert "No space left" in first["oserror"]
    assert out["second"]["failed"] == {} and sorted(out["second"]["ok"] + out["second"]["done"]) == SLIDES
    got = pd.read_json(io.StringIO(out["tiles"]))
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ref_tiles, check_dtype=False)
