"""The CPU reader (hefeat.extract.pipeline.InProcessTiles): the DataLoader's batches, read by the main process's threads."""

from __future__ import annotations

import glob
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hefeat.extract import pipeline as p
from hefeat.slides import direct_read
from hefeat.slides.reader import Slide
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

ENC = dict(encoder="resnet18", weights="none", layer="layer2")


def _jobs(cohort, tmp_path) -> list[SimpleNamespace]:
    """Three slides' tile grids (scan order, 7 / 5 / 9 tiles) with a slide that does not open between them."""
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:3]
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"II*\0" + b"\0" * 4000)
    jobs = []
    for path, n in zip([paths[0], str(broken), paths[1], paths[2]], (7, 4, 5, 9), strict=True):
        xy = np.array([(300 + 224 * (i % 4), 200 + 224 * (i // 4)) for i in range(n)], np.int64)
        jobs.append(SimpleNamespace(path=path, mpp=0.5, coords=xy))
    return jobs


def _batches(loader) -> list[tuple]:
    return [(imgs.numpy().copy(), ks.tolist(), ts.tolist(), list(errs)) for imgs, ks, ts, errs in loader]


@pytest.mark.parametrize(("threads", "direct"), [(1, True), (2, True), (3, True), (2, False)])
def test_batches_equal_the_dataloaders(threads, direct, cohort, tmp_path, monkeypatch):
    """Same pixels, slides, tiles and errors in the same order as DataLoader(TileDataset): across slide boundaries,
    for a slide that does not open (each of its tiles fails) and a region that fails to read; threads sharing a slide
    read through the direct JPEG reader and through OpenSlide."""
    from torch.utils.data import DataLoader

    if not direct:
        monkeypatch.setenv("HEFEAT_DIRECT_JPEG", "0")
    jobs = _jobs(cohort, tmp_path)
    real_read = Slide.read

    def read(self, x, y, size, mpp):
        if (x, y) == (300 + 224, 200) and self.path.name == "S02.tiff":
            raise OSError("sector unreadable")
        return real_read(self, x, y, size, mpp)

    monkeypatch.setattr(Slide, "read", read)
    ds = p.TileDataset(224, 0.5)
    want = _batches(DataLoader(ds, batch_sampler=p.ClaimingBatches([], iter(jobs), 8), num_workers=0))
    got = _batches(p.InProcessTiles(p.ClaimingBatches([], iter(jobs), 8), 224, 0.5, threads))
    assert [len(b[1]) for b in got] == [8, 8, 8, 1]  # full batches across slides
    assert len(got) == len(want)
    for (gi, gk, gt, ge), (wi, wk, wt, we) in zip(got, want, strict=True):
        assert gi.dtype == np.uint8 and gi.tobytes() == wi.tobytes()
        assert (gk, gt, ge) == (wk, wt, we)
    errs = [e for b in got for e in b[3]]
    ks = [k for b in got for k in b[1]]
    assert all(e for e, k in zip(errs, ks, strict=True) if k == 1)  # the broken slide: every tile an error
    assert [e for e, k in zip(errs, ks, strict=True) if k == 2] == ["", "OSError: sector unreadable", "", "", ""]
    assert sum(bool(e) for e in errs) == 4 + 1
    assert not any(b[0][[i for i, k in enumerate(b[1]) if k == 0]].max() == 0 for b in got if 0 in b[1])


def test_slides_are_closed_when_passed_and_when_the_loop_stops(cohort, tmp_path, monkeypatch):
    jobs = [j for j in _jobs(cohort, tmp_path) if not j.path.endswith("broken.tiff")]
    live: set[int] = set()
    real_init, real_close = Slide.__init__, Slide.close

    def init(self, *a, **k):
        real_init(self, *a, **k)
        live.add(id(self))

    def close(self):
        live.discard(id(self))
        real_close(self)

    monkeypatch.setattr(Slide, "__init__", init)
    monkeypatch.setattr(Slide, "close", close)
    seen = []
    it = iter(p.InProcessTiles(p.ClaimingBatches([], iter(jobs), 4), 224, 0.5, 2))
    for _ in range(4):  # 7 + 5 + 9 tiles: batch 4 (tiles 12-15) holds the third slide only
        seen.append(len(live))
        next(it)
    assert seen[:3] == [0, 1, 2] and len(live) == 1  # the first two were closed once the batches moved past them
    it.close()  # the loop stops early (an error, Ctrl-C): the open slide is closed too
    assert live == set()


def test_threads_decode_each_jpeg_tile_once(cohort):
    """A JPEG tile another thread is decoding is waited for, not decoded twice (the reader splits neighbouring tiles
    across threads)."""
    calls, started, second = [], threading.Event(), threading.Event()
    real = direct_read.simplejpeg.decode_jpeg

    def decode(data, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            started.set()
            second.wait(2.0)  # released at once if another thread decodes it too; else after 2 s
        else:
            second.set()
        return real(data, **kw)

    with Slide(cohort / "slides" / "S01.tiff") as s:
        s.read(0, 0, 8, s.mpp.x)  # opens and checks the direct reader
        d = s._direct
        d._tiles.clear()
        calls.clear()
        direct_read.simplejpeg.decode_jpeg, saved = decode, real
        try:
            x, y = 300, 300  # one JPEG tile (256 px grid) holds this 64 px region
            a = threading.Thread(target=s.read, args=(x, y, 64, s.mpp.x), name="a")
            a.start()
            assert started.wait(5)
            b_out = {}
            b = threading.Thread(target=lambda: b_out.update(img=s.read(x + 8, y + 8, 64, s.mpp.x)), name="b")
            b.start()
            a.join()
            b.join()
        finally:
            direct_read.simplejpeg.decode_jpeg = saved
        assert calls == ["a"]
        np.testing.assert_array_equal(b_out["img"], s.read(x + 8, y + 8, 64, s.mpp.x))


def test_cpu_extraction_reads_in_process_and_equals_a_worker_run(tmp_path, cohort):
    """By default a CPU run reads between forwards in the main process (recorded in its summary), and its features
    are byte-identical to a run with a DataLoader worker."""
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:3]
    got = {}
    for name, workers in (("threads", None), ("worker", 1)):
        st = Store.init(tmp_path / name)
        ingest_slides(st, paths)
        tid = run_tiling(st, TilingParams(max_tiles=12)).extra["tiling_id"]
        s = p.run_extraction(st, tiling_id=tid, precision="fp32", dtype="float32",
                             options=p.ExtractOptions(batch_size=8, workers=workers), **ENC)
        assert sorted(s.ok) == ["S01", "S02", "S03"]
        got[name] = (s.extra["decode"], {sid: read_features(st.features_path(s.extra["extraction_id"], sid))
                                         for sid in s.ok})
    assert "in-process" in got["threads"][0] and f"{torch.get_num_threads()} thread" in got["threads"][0]
    assert "1 DataLoader worker" in got["worker"][0]
    a, b = got["threads"][1], got["worker"][1]
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid].shape[0] == 12 and a[sid].tobytes() == b[sid].tobytes(), sid


def test_storage_note_rule():
    """A note only where reads took over 15 % of the loop and the reading threads were mostly idle (waiting)."""
    from hefeat.extract.reading import storage_note

    note = storage_note(2.0, 0.2, 6.0)
    assert note and "2.0 s of the 6.0 s loop (33%)" in note and "--workers N" in note
    assert storage_note(0.8, 0.1, 6.0) is None  # 13 % of the loop
    assert storage_note(2.0, 1.0, 6.0) is None  # the threads were busy decoding: CPU-bound, workers would not help
    assert storage_note(2.0, 0.2, 0.0) is None
    assert storage_note(2.0, 0.2, 6.0, busy=True) is None  # other processes had the cores: waiting for CPU, maybe


def test_reads_waiting_on_storage_are_noted(tmp_path, cohort, monkeypatch):
    """Slides on slow storage (each region read waits 50 ms, using no CPU): the summary says so and names --workers."""
    import time

    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2]
    st = Store.init(tmp_path / "st")
    ingest_slides(st, paths)
    tid = run_tiling(st, TilingParams(max_tiles=8)).extra["tiling_id"]
    real_read = Slide.read

    def slow(self, *a, **k):
        time.sleep(0.05)
        return real_read(self, *a, **k)

    monkeypatch.setattr(Slide, "read", slow)
    monkeypatch.setattr(p, "others_share", lambda a, b: 0.0)  # a quiet machine, whatever else the test runner runs
    s = p.run_extraction(st, tiling_id=tid, precision="fp32", dtype="float32",
                         options=p.ExtractOptions(batch_size=8), **ENC)
    assert sorted(s.ok) == ["S01", "S02"]
    tm = s.extra["timings"]
    assert tm["read_wait_s"] >= 16 * 0.05 / torch.get_num_threads() * 0.9 and tm["read_cpu_s"] < tm["read_wait_s"]
    assert "waited on storage" in s.extra["read_note"] and "--workers N" in s.extra["read_note"]
    monkeypatch.setattr(p, "others_share", lambda a, b: 0.6)  # other processes had the cores: no claim about storage
    again = p.run_extraction(st, tiling_id=tid, precision="fp32", dtype="float16",
                             options=p.ExtractOptions(batch_size=8), **ENC)
    assert sorted(again.ok) == ["S01", "S02"] and again.extra["read_note"] is None


def test_prefetched_keeps_order_raises_the_threads_error_and_closes_its_source():
    """Items in order, read ahead by at most `depth`; an error in the thread is raised to the consumer after the
    items before it; close() mid-way stops the thread and closes the generator (its `with` blocks run)."""
    from hefeat.extract.reading import Prefetched

    made, closed = [], threading.Event()

    def gen(n, fail_at=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"tile {i} unreadable")
                made.append(i)
                yield i
        finally:
            closed.set()

    assert list(Prefetched(gen(7))) == list(range(7)) and closed.is_set()
    made.clear()
    closed.clear()
    it = Prefetched(gen(5, fail_at=3))
    got = [next(it), next(it), next(it)]
    with pytest.raises(ValueError, match="tile 3 unreadable"):
        next(it)
    assert got == [0, 1, 2] and closed.is_set()
    with pytest.raises(StopIteration):
        next(it)
    made.clear()
    closed.clear()
    it = Prefetched(gen(1000), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.is_set() and not it._thread.is_alive()
    assert len(made) <= 1 + 2 + 1  # the one consumed, `depth` queued, one being put when stopped: no read-through
    rest: list = []  # what was queued before close, then the end: a closed reader does not hang its consumer
    drain = threading.Thread(target=lambda: rest.extend(it), daemon=True)
    drain.start()
    drain.join(5)
    assert not drain.is_alive(), "next() on a closed Prefetched blocked"
    assert rest == list(range(1, 1 + len(rest))) and len(rest) <= 2
