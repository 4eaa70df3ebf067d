"""hefeat.heap: freed memory kept for reuse inside a block (no fresh page faults), glibc's behaviour restored after,
and the extraction loop and its calibration run inside it."""

from __future__ import annotations

import ctypes
import resource
import shutil

import pytest

from hefeat import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only (mallopt)")

BLOCK = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default
PAGES = BLOCK // 4096


def _faults_of_a_second_block() -> int:
    """Minor page faults of writing a 64 MiB malloc'd block right after an equal one was written and freed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    first = libc.malloc(BLOCK)
    libc.memset(first, 1, BLOCK)
    libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(BLOCK)
    libc.memset(second, 2, BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(second)
    return faults


def test_freed_memory_is_reused_inside_the_block_and_returned_after(monkeypatch):
    """Inside: the second block reuses the first one's pages (no fresh faults). Outside, before and after: glibc
    maps every such block afresh, so writing it faults in each of its pages."""
    monkeypatch.delenv("HEFEAT_HEAP", raising=False)
    assert _faults_of_a_second_block() >= 0.9 * PAGES
    with heap.reuse_freed_memory() as on:
        assert on and heap.active()
        _faults_of_a_second_block()  # the heap grows to hold it once
        assert _faults_of_a_second_block() <= 0.05 * PAGES
    assert not heap.active()
    assert _faults_of_a_second_block() >= 0.9 * PAGES


def test_nested_blocks_restore_only_when_the_last_one_exits(monkeypatch):
    monkeypatch.delenv("HEFEAT_HEAP", raising=False)
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            _faults_of_a_second_block()
        assert heap.active()
        assert _faults_of_a_second_block() <= 0.05 * PAGES  # the inner exit did not restore
    assert not heap.active()
    assert _faults_of_a_second_block() >= 0.9 * PAGES


def test_heap_system_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv("HEFEAT_HEAP", "system")
    with heap.reuse_freed_memory() as on:
        assert not on and not heap.active()
        assert _faults_of_a_second_block() >= 0.9 * PAGES


def test_the_extraction_loop_and_its_calibration_keep_freed_memory(tiled, tmp_path, monkeypatch):
    """Every forward of the loop and the calibration's timings run inside the block; it is over after the run."""
    import hefeat.extract.pipeline as pipeline
    import hefeat.extract.precision as precision
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.store.catalog import Store

    monkeypatch.delenv("HEFEAT_HEAP", raising=False)
    monkeypatch.setenv("HEFEAT_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: the calibration runs
    seen: dict[str, list[bool]] = {"measure": [], "embed": []}
    real_measure, real_embed = precision.measure, pipeline.embed_batch

    def measure(*a, **k):
        seen["measure"].append(heap.active())
        return real_measure(*a, **k)

    def embed(*a, **k):
        seen["embed"].append(heap.active())
        return real_embed(*a, **k)

    monkeypatch.setattr(precision, "measure", measure)
    monkeypatch.setattr(pipeline, "embed_batch", embed)
    st0, tid, _ = tiled
    shutil.copytree(st0.root, tmp_path / "store")
    s = run_extraction(Store(tmp_path / "store"), tiling_id=tid, slides=["S01", "S02"], encoder="resnet18",
                       weights="none", layer="layer1", options=ExtractOptions(batch_size=8, workers=0))
    assert s.ok == ["S01", "S02"] and s.extra["precision_choice"]["source"] == "measured"
    assert seen["measure"] == [True]
    assert len(seen["embed"]) >= 2 and all(seen["embed"])
    assert not heap.active()
