"""Freed memory kept for reuse while a loop allocates the same large buffers batch after batch.

glibc's malloc serves every block of 32 MiB or more (less, early on) with its own mmap and returns it to the
kernel on free. A CNN forward on the CPU frees and re-allocates its activations every batch (ResNet-50 layer3 at
batch 64 in bf16: ~2 GB), so every batch page-faults ~500,000 fresh 4 KiB pages that the kernel zeroes first.
Measured on a 2-core Xeon VM (benchmarks/extract_slides.py, bare encoder, 1,000 tiles): 13 s of kernel time per
28 s of user time, 47.6 tiles/s; with large blocks served from the heap and the heap never trimmed, 0.3 s of
kernel time and 72.3 tiles/s (fp32: 23.3 -> 37.6 tiles/s); peak RSS 1.40 -> 1.53 GB (benchmarks/README.md,
round 14; also fine-tuning steps and fit genes' chunks). CPU tuning guides suggest preloading a caching
allocator (jemalloc, TCMalloc) for the same reason; this needs no preload (jemalloc preloaded here slowed the
bare encoder 28 %).

`reuse_freed_memory()` switches that on for a block (mallopt: no mmap for large blocks, no trimming), and
afterwards restores glibc's defaults and hands the freed memory back (malloc_trim). It does nothing where the C
library is not glibc, or when HEFEAT_HEAP=system. Process-wide while active; nested and concurrent blocks share
one activation (the last one out restores).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: a free heap top of 2 GiB or more is still trimmed

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc():
    """The process's C library if it is glibc with mallopt and malloc_trim, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _libc_to_use():
    """glibc to call mallopt on, or None: not glibc, or HEFEAT_HEAP=system."""
    return None if os.environ.get("HEFEAT_HEAP", "reuse").strip().lower() == "system" else _glibc()


def enabled() -> bool:
    """Whether `reuse_freed_memory` acts here: glibc, and HEFEAT_HEAP is not 'system'."""
    return _libc_to_use() is not None


def active() -> bool:
    """Whether freed memory is being kept for reuse now (inside a `reuse_freed_memory` block that acts)."""
    return _depth > 0


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Inside the block glibc keeps freed memory for reuse instead of unmapping it (module docstring); yields whether
    that applies here. glibc's defaults are restored and the kept memory trimmed when the last block exits."""
    global _depth
    libc = _libc_to_use()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
