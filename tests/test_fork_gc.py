"""Workers forked inside a frozen block do not copy their parent's Python heap when they collect garbage."""

from __future__ import annotations

import gc
import os
import resource

import pytest

from hefeat import fork_gc


def _child_faults_on_collect(frozen: bool) -> int:
    """Minor page faults a forked child takes on one full gc.collect() (the parent's heap shared copy-on-write)."""
    r, w = os.pipe()
    if frozen:
        fork_gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                gc.collect()
                os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before).encode())
            finally:
                os._exit(0)
    finally:
        if frozen:
            fork_gc.unfreeze()
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return int(f.read())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_in_a_frozen_block_does_not_copy_the_parents_heap():
    heap = [[i] for i in range(400_000)]  # tracked objects: ~30 MB of GC headers across ~8,000 pages
    thawed, frozen = _child_faults_on_collect(False), _child_faults_on_collect(True)
    assert thawed > 4_000  # every page the collection walked was copied
    assert frozen * 10 < thawed
    assert len(heap) == 400_000


def _frozen(obj) -> bool:
    return not any(o is obj for o in gc.get_objects())  # the permanent generation is outside every generation


def test_nested_blocks_share_one_freeze_and_the_last_unfreezes():
    assert gc.get_freeze_count() == 0
    early = [[]]
    fork_gc.freeze()
    assert _frozen(early)
    late = [[]]
    fork_gc.freeze()  # a second holder (a fine-tuning fold's loader inside an extraction, say)
    fork_gc.freeze()
    assert not _frozen(late)  # nothing re-frozen by the inner holders
    fork_gc.unfreeze()
    fork_gc.unfreeze()
    assert _frozen(early)  # still held by the outer one
    fork_gc.unfreeze()
    assert not _frozen(early) and gc.get_freeze_count() == 0
    fork_gc.unfreeze()  # an unmatched unfreeze is harmless
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_before_stays():
    """The CLI freezes its imports for good (hefeat.cli.common.quiet_gc): a loop's block must not thaw them."""
    kept = [[]]
    gc.freeze()
    try:
        fork_gc.freeze()
        fork_gc.unfreeze()
        assert _frozen(kept)
    finally:
        gc.unfreeze()
