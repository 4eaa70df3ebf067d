"""Objects alive when DataLoader workers fork are frozen out of the garbage collector until the workers are done.

A forked worker shares its parent's memory copy-on-write. CPython's cyclic GC writes to the header of every
tracked object it traverses, so the worker's first collection copies every page of the parent's Python heap
(torch, timm, the store's tables...): measured on the development VM with `run_extraction` called from Python,
the first tile the worker read took 226 ms instead of 26 and the loop waited 0.34-0.52 s for its first batch
instead of 0.14 (benchmarks/README, round 16). The CLI already froze its imports (hefeat.cli.common.quiet_gc);
notebooks, scripts and the tests do not. `gc.freeze()` right before the fork moves everything alive into a
permanent generation that no collection visits, in the worker or in the parent (the CPython documentation's
advice for pre-fork servers); objects made afterwards are collected as usual. Callers pair `freeze()` before
the workers start with `unfreeze()` once they are gone. Nested and concurrent holders share one freeze: the
last one out unfreezes, unless something was frozen before the first one (the CLI freezes its imports for good,
hefeat.cli.common.quiet_gc): then everything stays frozen, as that owner meant.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_depth = 0
_thaw = False  # whether the last unfreeze thaws (nothing was frozen before the first freeze)


def freeze() -> None:
    """Freeze the objects alive now (the first of nested calls freezes; pair with `unfreeze`)."""
    global _depth, _thaw
    with _lock:
        if _depth == 0:
            _thaw = gc.get_freeze_count() == 0
            gc.freeze()
        _depth += 1


def unfreeze() -> None:
    """Undo one `freeze`; the last one returns the frozen objects to the collector."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0 and _thaw:
            gc.unfreeze()
