"""numpy's transparent-huge-page advice, turned off while a streamed fit runs.

numpy asks the kernel to back every array of 4 MiB or more with 2 MiB pages (madvise MADV_HUGEPAGE). `fit genes`
allocates and frees chunk-sized arrays thousands of times (each fold's float32 rows and residuals, patient means,
rank blocks); each comes back as fresh memory that the kernel zeroes on first touch, and with the advice it zeroes
whole 2 MiB pages. Measured on the fabricated 10,000-slide store: `clear_page` took 23.7 % of the CPU samples (perf)
of `fit genes` on 6,000 genes with the advice and 0.9 % without; on all 20,000 genes, in alternation, 50.8-50.9 s
without it against 54.4-56.4 s with it (kernel time 12.7-13.7 against 18.3-23.1 CPU s). The flag is process-wide;
`no_hugepage_advice` restores it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


def _setter():
    """numpy's switch for the advice (returns the previous setting), or None where this numpy has none."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


@contextlib.contextmanager
def no_hugepage_advice() -> Iterator[None]:
    """numpy allocates without the huge-page advice inside the block (module docstring); the setting before it is
    restored after it, also on an error."""
    setter = _setter()
    if setter is None:
        yield
        return
    before = setter(False)
    try:
        yield
    finally:
        setter(before)
