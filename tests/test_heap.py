"""hefeat.heap: freed memory kept for reuse inside a block (no fresh page faults), glibc's behaviour restored and the
kept memory handed back after, and the extraction loop and its calibration run inside it.

The malloc checks run in a fresh interpreter: what glibc does with a 64 MiB request outside the block depends on the
process's history (a free chunk left in the heap by earlier work is reused rather than mapped afresh), so only a
process whose history the test controls gives a known answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from hefeat import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only (mallopt)")

BLOCK = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default
PAGES = BLOCK // 4096

_SCRIPT = textwrap.dedent("""
    import ctypes, json, resource, sys
    from hefeat import heap

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    BLOCK = %d

    def second_block_faults():
        # minor faults of writing a block right after an equal one was written and freed
        first = libc.malloc(BLOCK)
        libc.memset(first, 1, BLOCK)
        libc.free(first)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        second = libc.malloc(BLOCK)
        libc.memset(second, 2, BLOCK)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(second)
        return faults

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

    out = {"before": second_block_faults()}
    with heap.reuse_freed_memory() as on:
        out["on"] = on
        second_block_faults()  # the heap grows to hold it once
        out["inside"] = second_block_faults()
        if sys.argv[1] == "nested":
            with heap.reuse_freed_memory():
                second_block_faults()
            out["after_inner_exit"] = second_block_faults()
        blocks = [libc.malloc(BLOCK) for _ in range(4)]  # 256 MiB written, freed, kept
        for b in blocks:
            libc.memset(b, 3, BLOCK)
        for b in reversed(blocks[1:]):
            libc.free(b)
        keep = blocks[0]  # holds the heap's top where it is: the rest is kept mid-heap, not trimmed by a free
        out["rss_kept_mb"] = rss_mb()
    out["rss_after_mb"] = rss_mb()
    libc.free(keep)
    out["active_after"] = heap.active()
    out["after"] = second_block_faults()
    print(json.dumps(out))
""") % BLOCK


def _run(scenario: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "HEFEAT_HEAP"}
    p = subprocess.run([sys.executable, "-c", _SCRIPT, scenario], capture_output=True, text=True,
                       env={**base, **env}, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_freed_memory_is_reused_inside_the_block_and_handed_back_after():
    """Before: glibc maps a 64 MiB block afresh, so writing it faults in every page. Inside: the second block reuses
    the first one's pages. On exit the kept memory goes back to the kernel and fresh blocks are mapped again."""
    r = _run("plain")
    assert r["on"] is True and r["active_after"] is False
    assert r["before"] >= 0.9 * PAGES
    assert r["inside"] <= 0.05 * PAGES
    assert r["rss_kept_mb"] - r["rss_after_mb"] >= 150  # ~192 MiB freed inside the block, trimmed at its exit
    assert r["after"] >= 0.9 * PAGES


def test_nested_blocks_restore_only_when_the_last_one_exits():
    r = _run("nested")
    assert r["after_inner_exit"] <= 0.05 * PAGES  # the inner exit did not restore
    assert r["after"] >= 0.9 * PAGES


def test_heap_system_leaves_glibc_alone():
    r = _run("plain", HEFEAT_HEAP="system")
    assert r["on"] is False
    assert r["inside"] >= 0.9 * PAGES
    assert r["rss_kept_mb"] - r["rss_after_mb"] < 50  # nothing kept, nothing to hand back


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
