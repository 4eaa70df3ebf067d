"""One thread policy for stage-2 training (torch heads, scikit-learn MLPs/logistic regressions, BLAS).

torch's OpenMP pool and OpenBLAS's pool each start one thread per core and spin-wait between calls.
Stage-2 nets alternate many small torch steps with small BLAS calls (scikit-learn's lbfgs), so both
pools end up spinning on the same cores: on the 2-core machine `fit transfer` ran 63 s per split, and
17 s with BLAS limited to one thread. Measured again with `benchmarks/transfer.py` (one run, busy
machine, load 15): torch and BLAS on every core 424 s per split, BLAS on one thread 327 s, both on
one thread 33 s, two single-threaded processes 51 s (their start-up not amortised over 2 splits on a
machine with no idle core). So, chosen once here for all of stage 2:

- BLAS runs single-threaded inside stage-2 training (its matrices are small);
- a torch step smaller than PARALLEL_MIN_FLOPS runs on one thread (waking a thread pool costs more
  than it saves); bigger steps (HE2RNA on thousands of super-tiles) use every core;
- independent units of work (transfer's A/B splits) run in parallel processes, one per idle core,
  each single-threaded: that is how small nets use the cores (`parallel_map`); on a busy machine
  they run in this process, single-threaded.

HEFEAT_TORCH_THREADS / HEFEAT_BLAS_THREADS override the choice (0 = the libraries' own default),
HEFEAT_JOBS the number of worker processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import lru_cache

from hefeat.cpus import available_cores  # noqa: F401  (re-exported: callers and tests use threads.available_cores)

PARALLEL_MIN_FLOPS = 1e9  # per training step (forward + backward): ~0.1 s on one core


def work_threads() -> int:
    """Threads for one unit of numpy work split over cores (ridge gene chunks): every core, but one inside a
    parallel_map worker process (the processes already use the cores)."""
    return 1 if os.environ.get("HEFEAT_WORKER") else available_cores()


def split_threads(items: int, min_items: int, cap: int | None = None) -> int:
    """Threads for `items` independent items in blocks of >= min_items: one per core (work_threads), or cap."""
    return max(1, min(work_threads() if cap is None else max(1, cap), items // min_items))


def thread_map(fn: Callable, items: list, workers: int | None = None) -> list:
    """[fn(x) for x in items], in order, on up to `workers` threads (default: every core); serial for one item or
    one worker. For numpy work that releases the GIL (sorts, gathers, ufuncs, copies) on independent blocks; the
    pool is made per call (a kept one would not survive a fork)."""
    workers = min(available_cores() if workers is None else workers, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's controller, made once: threadpool_limits() inspects the loaded libraries on every call
    (0.77 ms, more than a small ridge fit's eigh), a kept controller's limit() costs ~2 µs."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_blas_thread():
    """A context with every BLAS pool on one thread, restored on leaving. Enter it on the thread that starts the
    workers: OpenBLAS (0.3.31) keeps a size set on another thread for that thread only."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    return int(v) if v.isdigit() else None


@lru_cache(maxsize=1)
def _overrides() -> tuple[int | None, int | None]:
    return _env_int("HEFEAT_TORCH_THREADS"), _env_int("HEFEAT_BLAS_THREADS")


def thread_policy(flops_per_step: float | None = None) -> dict:
    """{'torch': threads for torch ops (None: library default), 'blas': BLAS threads (None: no limit)}."""
    t, b = _overrides()
    if t is None:
        small = flops_per_step is not None and flops_per_step < PARALLEL_MIN_FLOPS
        torch_threads = 1 if small or os.environ.get("HEFEAT_WORKER") else available_cores()
    else:
        torch_threads = t or None
    return {"torch": torch_threads, "blas": 1 if b is None else (b or None)}


_depth = 0


@contextlib.contextmanager
def training_threads(flops_per_step: float | None = None) -> Iterator[dict]:
    """Apply the thread policy (and flush denormals) while training; nested uses keep the outer one."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield thread_policy(flops_per_step)
        finally:
            _depth -= 1
        return
    import torch
    from threadpoolctl import threadpool_limits

    pol = thread_policy(flops_per_step)
    prev = torch.get_num_threads()
    _depth = 1
    try:
        if pol["torch"]:
            torch.set_num_threads(pol["torch"])
        torch.set_flush_denormal(True)  # sigmoid/weight-decay training drifts into denormals (~6x slower steps)
        limits = threadpool_limits(limits=pol["blas"], user_api="blas") if pol["blas"] else contextlib.nullcontext()
        with limits:
            yield pol
    finally:
        _depth = 0
        torch.set_flush_denormal(False)
        torch.set_num_threads(prev)


def _in_worker(fn: Callable, arg):
    os.environ["HEFEAT_WORKER"] = "1"
    with training_threads(flops_per_step=0):
        return fn(arg)


def idle_cores() -> int:
    """Cores not busy with other work right now (cores minus the 1-minute load, at least 1)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return available_cores()
    return max(1, min(available_cores(), int(available_cores() - load + 1)))


def parallel_map(fn: Callable, items: list, *, n_jobs: int | None = None) -> list:
    """fn over items in worker processes (one per idle core, each single-threaded), results in order.

    fn must be a module-level function. Workers cost a start-up (imports), so they are used only
    with at least two items per worker and when cores are idle (on a busy machine, one
    single-threaded process was fastest: benchmarks/transfer.py); else everything runs here.
    HEFEAT_JOBS overrides the number of processes.
    """
    n = n_jobs or _env_int("HEFEAT_JOBS") or min(idle_cores(), len(items) // 2)
    n = min(n, len(items))
    if n <= 1 or os.environ.get("HEFEAT_WORKER"):
        with training_threads(flops_per_step=0):
            return [fn(x) for x in items]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n, backend="loky")(delayed(_in_worker)(fn, x) for x in items)
