"""Decode once: tiling + extraction from one read of each tile equals tiling, then extraction, byte for byte."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.reader import Slide
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store import faults
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

SLIDES = ["S01", "S02", "S03"]
ENC = dict(encoder="resnet18", weights="none", layer="layer1", precision="fp32", dtype="float32")
OPT = dict(batch_size=8, workers=0)
RULES = {
    "otsu-max-tiles": TilingParams(max_tiles=12),
    "mean-rgb": TilingParams(mpp=1.0, size=112, background="mean-rgb"),
    "density": TilingParams(mpp=1.0, size=112, background="density", top_n=6),
    "spots": TilingParams(mpp=1.0, size=112, spots=True),
}
FIT = {"otsu-max-tiles": "auto", "mean-rgb": "native", "density": "resize", "spots": "resize"}  # input plans


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    faults.disarm()


def _store(root, cohort, *, spots: bool = False) -> Store:
    st = Store.init(root)
    ingest_slides(st, [cohort / "slides" / f"{s}.tiff" for s in SLIDES])
    if spots:  # S01 and S03 have spots, S02 has none
        from hefeat.store.ingest import ingest_spots

        ingest_spots(st, cohort / "spots.parquet", allow_unmatched=True)
    return st


@pytest.fixture(scope="module")
def ref(tmp_path_factory, cohort):
    """(store, tiling id, extraction id): the otsu --max-tiles 12 tiling, then the extraction. Read-only."""
    st = _store(tmp_path_factory.mktemp("ref"), cohort)
    tid = run_tiling(st, RULES["otsu-max-tiles"]).extra["tiling_id"]
    return st, tid, run_extraction(st, tiling_id=tid, options=ExtractOptions(**OPT), **ENC).extra["extraction_id"]


class ReadCounter:
    """Counts Slide.read calls per region (slide, x, y, size px, µm/px) in this process, all threads."""

    def __init__(self, monkeypatch):
        self.n: collections.Counter = collections.Counter()
        lock, orig = threading.Lock(), Slide.read

        def read(slide, x, y, size_px, mpp):
            with lock:
                self.n[(slide.path.stem, int(round(x)), int(round(y)), int(size_px), float(mpp))] += 1
            return orig(slide, x, y, size_px, mpp)

        monkeypatch.setattr(Slide, "read", read)

    def of(self, st: Store, tid: str, params: TilingParams) -> list[int]:
        """Read counts of every kept tile's region."""
        t = st.sql("SELECT slide_id, x, y FROM tiles ORDER BY slide_id, tile_id", tiling=tid)
        return [self.n[(sid, int(x), int(y), params.size, float(params.mpp))] for sid, x, y in t.itertuples(index=False)]


class SinkSpy:
    """Every block handed to the pipeline's feature writer (hefeat.extract.writer.FeatureSink.put): slide, first row, rows."""

    def __init__(self, monkeypatch):
        from hefeat.extract.writer import FeatureSink

        self.blocks: list[tuple[str, int, int]] = []
        orig = FeatureSink.put

        def put(sink, job, start, rows):
            self.blocks.append((job.slide_id, int(start), len(rows)))
            return orig(sink, job, start, rows)

        monkeypatch.setattr(FeatureSink, "put", put)

    def rows(self) -> dict[str, int]:
        """Rows written per slide."""
        out: dict[str, int] = collections.Counter()
        for sid, _, n in self.blocks:
            out[sid] += n
        return dict(out)


def _outputs(st: Store, tid: str, eid: str, slides: list[str] = SLIDES) -> dict:
    """Every slide's tiles Parquet bytes, feature rows and coords."""
    out = {}
    for sid in slides:
        import h5py

        with h5py.File(st.features_path(eid, sid), "r") as f:
            coords = f["coords"][:]
        out[sid] = (st.tiles_path(tid, sid).read_bytes(), read_features(st.features_path(eid, sid)).tobytes(), coords.tobytes())
    return out


@pytest.mark.parametrize("rule", list(RULES))
def test_fused_equals_tile_then_extract_and_reads_each_tile_once(tmp_path, cohort, monkeypatch, rule):
    params = RULES[rule]
    slides = ["S01", "S03"] if params.spots else SLIDES
    two = _store(tmp_path / "two", cohort, spots=params.spots)
    count_two = ReadCounter(monkeypatch)
    tid = run_tiling(two, params).extra["tiling_id"]
    sink_two = SinkSpy(monkeypatch)
    ref = run_extraction(two, tiling_id=tid, fit=FIT[rule], options=ExtractOptions(**OPT), **ENC)
    reads_two = count_two.of(two, tid, params)
    monkeypatch.undo()

    one = _store(tmp_path / "one", cohort, spots=params.spots)
    count_one = ReadCounter(monkeypatch)
    sink_one = SinkSpy(monkeypatch)
    s = run_extraction(one, tile_params=params, fit=FIT[rule], options=ExtractOptions(**OPT), **ENC)
    reads_one = count_one.of(one, tid, params)
    # Both paths write every row through the pipeline's one feature writer (decode-once has no copy of it).
    n_tiles = one.sql("SELECT slide_id, count(*) n FROM tiles GROUP BY ALL", tiling=tid)
    assert sink_one.rows() == sink_two.rows() == dict(zip(n_tiles["slide_id"], n_tiles["n"], strict=True))
    eid = ref.extra["extraction_id"]
    assert s.extra["extraction_id"] == eid and sorted(s.ok) == slides and s.failed == {}
    assert _outputs(one, tid, eid, slides) == _outputs(two, tid, eid, slides)
    assert one.finished("tiling", tid)["digest"].tolist() == two.finished("tiling", tid)["digest"].tolist()
    assert one.finished("extraction", eid)["digest"].tolist() == two.finished("extraction", eid)["digest"].tolist()
    d = s.extra["decode_once"]
    n = len(reads_one)
    assert reads_two == [2] * n  # QC at tiling, again for the embedding
    if rule == "density":  # top-N of the slide: known only after every read, so tiled first
        assert not d["used"] and "density" in d["why"] and reads_one == [2] * n
        assert d["tiles_read_twice"] == n and d["tiles_read_once"] == 0 and d["tiling"]["ok"] == 3
    else:
        assert d["used"] and d["why"] is None and reads_one == [1] * n
        assert d["tiles_read_once"] == n and d["tiles_read_twice"] == 0 and d["tiling"]["ok"] == len(slides)
        assert d["tile_reads"] == sum(count_one.n.values()) and d["read_s_saved_est"] > 0
        assert max(count_one.n.values()) == 1  # candidates the rule drops are read once too, nothing twice
    # Re-running finds everything done on both paths.
    again = run_extraction(one, tile_params=params, fit=FIT[rule], options=ExtractOptions(**OPT), **ENC)
    assert again.ok == [] and sorted(again.done) == slides
    assert not again.extra["decode_once"]["used"] and "tiled before" in again.extra["decode_once"]["why"]
    assert again.extra["decode_once"]["tiling"]["already_done"] == len(slides)


def test_fused_mixes_with_slides_tiled_before_and_fails_non_finite_slides_only(tmp_path, cohort, monkeypatch, ref):
    params = RULES["otsu-max-tiles"]
    ref_st, tid, eid = ref
    st = _store(tmp_path / "st", cohort)
    run_tiling(st, params, slides=["S02"])  # one slide tiled before: the normal path embeds it
    import hefeat.extract.compute as compute

    real, calls = compute.check_finite, []

    def first_batch_bad(feats, first, prec):  # the first fused batch (S01's tile 0..7) comes out non-finite
        calls.append(first)
        return "non-finite embeddings (injected)" if len(calls) == 1 else real(feats, first, prec)

    monkeypatch.setattr(compute, "check_finite", first_batch_bad)
    s = run_extraction(st, tile_params=params, options=ExtractOptions(**OPT), **ENC)
    d = s.extra["decode_once"]
    assert d["used"] and d["tiles_read_twice"] == 12 and d["tiles_read_once"] == 12  # S02 twice; S03 once; S01 failed
    assert set(s.failed) == {"S01"} and "injected" in s.failed["S01"] and sorted(s.ok) == ["S02", "S03"]
    rec = json.loads(st.status_path("extraction", eid, "S01").read_text())
    assert rec["reason_code"] == "non_finite"
    assert sorted(st.finished("tiling", tid)["slide_id"]) == SLIDES  # its tiles were committed all the same
    monkeypatch.undo()
    s2 = run_extraction(st, tile_params=params, options=ExtractOptions(**OPT), **ENC)
    assert s2.ok == ["S01"] and not s2.extra["decode_once"]["used"]
    assert _outputs(st, tid, eid) == _outputs(ref_st, tid, eid)


FUSED = textwrap.dedent("""
    import sys
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    run_extraction(Store(sys.argv[1]), tile_params=TilingParams(max_tiles=12), encoder="resnet18", weights="none",
                   layer="layer1", precision="fp32", dtype="float32", options=ExtractOptions(batch_size=8, workers=0))
""")


@pytest.mark.parametrize("fault", ["record.renamed:kill@1", "features.renamed:kill@1"])
def test_killed_between_tiling_and_features_commit_is_finished_by_a_rerun(tmp_path, cohort, fault, ref):
    params = RULES["otsu-max-tiles"]
    ref_st, tid, eid = ref
    st = _store(tmp_path / "st", cohort)
    env = {**os.environ, "HEFEAT_FAULT": fault, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", FUSED, str(st.root)], env=env, capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    # S01's tiles are committed (the tiling record is the first record written), its features are not.
    assert st.finished("tiling", tid)["slide_id"].tolist() == ["S01"]
    assert st.finished("extraction", eid).empty
    if fault.startswith("features.renamed"):
        assert st.features_path(eid, "S01").exists()  # renamed into place, but without a record nobody reads it
    s = run_extraction(st, tile_params=params, options=ExtractOptions(**OPT), **ENC)
    assert sorted(s.ok) == SLIDES and s.failed == {} and s.busy == {}
    d = s.extra["decode_once"]
    assert d["used"] and d["tiles_read_twice"] == 12 and d["tiles_read_once"] == 24  # S01 by the normal path
    assert _outputs(st, tid, eid) == _outputs(ref_st, tid, eid)
    assert not list(st.extraction_dir(eid).glob(".*tmp-*")) and not list(st.status_dir("extraction", eid).glob("*.lock"))


def test_cli_extract_tile_reports_decode_once_and_refuses_bad_specs(tmp_path, cohort):
    from click.testing import CliRunner

    from hefeat.cli import main

    _store(tmp_path / "st", cohort)
    args = ["extract", "--store", str(tmp_path / "st"), "--encoder", "resnet18", "--weights", "none", "--layer", "layer1",
            "--precision", "fp32", "--workers", "0", "--batch-size", "8", "--json"]
    r = CliRunner().invoke(main, [*args, "--tile", "max-tiles=4,mpp=0.5,size=224", "--slides", "S01"])
    assert r.exit_code == 0, r.output
    s = json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])[0]  # a warning may follow it
    assert s["decode_once"]["used"] and s["decode_once"]["tiles_read_once"] == 4 and s["ok"] == 1
    r = CliRunner().invoke(main, [*args, "--tile", "mpp=0.5,sise=224"])
    assert r.exit_code != 0 and "sise=224" in r.output and "Traceback" not in r.output
    tid = s["tiling_id"]
    r = CliRunner().invoke(main, [*args, "--tile", "mpp=0.5,size=224", "--tiling", tid])
    assert r.exit_code != 0 and "is not the tiling" in r.output
    np.testing.assert_equal(Store(tmp_path / "st").finished("tiling", tid)["n_tiles"].tolist(), [4])


def test_auto_precision_calibrates_on_real_tiles_before_any_slide_is_tiled(tmp_path, cohort, monkeypatch):
    # An empty precision cache of its own: a choice another test of the session cached would skip the calibration
    # (source 'cache', no calibration reads), and whether one did depends on the order the tests ran in.
    monkeypatch.setenv("HEFEAT_CACHE_DIR", str(tmp_path / "precision-cache"))
    st = _store(tmp_path / "st", cohort)
    count = ReadCounter(monkeypatch)
    s = run_extraction(st, tile_params=RULES["otsu-max-tiles"], slides=["S01"],
                       options=ExtractOptions(**OPT), **{**ENC, "precision": "auto"})
    assert s.ok == ["S01"] and s.extra["precision"] in ("fp32", "bf16", "fp16")
    assert s.extra["precision_choice"]["source"] == "measured" and s.extra["decode_once"]["used"]
    # The calibration read the slide's first 8 grid candidates (real tissue, not noise); every other read is the one read.
    twice = [k for k, v in count.n.items() if v == 2]
    assert len(twice) == 8 and all(k[0] == "S01" for k in twice) and max(count.n.values()) == 2
