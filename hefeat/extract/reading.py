"""Reading an extraction's tiles: batches of uint8 tiles, full across slide boundaries, with each tile's slide, index
and read error.

`ClaimingBatches` claims slides lazily and cuts full batches across them; `InProcessTiles` reads each batch in this
process with a few threads between forwards (the CPU reader); `TileDataset` is the same read for DataLoader workers
(the GPU reader). Both give the same tiles, errors and order (tests/test_inprocess_read.py).
"""

from __future__ import annotations

import time

import numpy as np

# Reads that took more than this share of the loop while the reading threads together used the CPU for less than
# half that time are waiting on storage: the in-process reader does not read ahead, DataLoader workers do. (Counted
# against one thread, not all: a slide's checks and opens run on one.)
IO_BOUND_SHARE = 0.15


def storage_note(read_s: float, read_cpu_s: float, loop_s: float, *, busy: bool = False) -> str | None:
    """A note for the run's summary when in-process reads waited on storage (see IO_BOUND_SHARE), else None.

    `busy`: other processes used the CPUs meanwhile, so the readers may have waited for a core, not for storage:
    no note (it could not say which)."""
    if busy or loop_s <= 0 or read_s <= IO_BOUND_SHARE * loop_s or read_cpu_s >= 0.5 * read_s:
        return None
    return (f"reading tiles took {read_s:.1f} s of the {loop_s:.1f} s loop ({read_s / loop_s:.0%}) with "
            f"{read_cpu_s:.1f} CPU-s of decoding: the reads waited on storage. On slow (network) storage, "
            f"--workers N reads ahead while the forward runs.")


def read_tile(slide, x: float, y: float, size: int, mpp: float) -> tuple[np.ndarray, str]:
    """One tile's pixels and "", or (where the slide did not open: `slide` is that exception; or the region did not
    read) a black tile and the error: a broken region fails its slide, not the batch."""
    if isinstance(slide, BaseException):
        return np.zeros((size, size, 3), np.uint8), f"{type(slide).__name__}: {slide}"
    try:
        return np.ascontiguousarray(slide.read(float(x), float(y), size, mpp)), ""
    except Exception as e:
        return np.zeros((size, size, 3), np.uint8), f"{type(e).__name__}: {e}"


class TileDataset:
    """Map-style dataset whose indices are tile references (k, t, path, mpp, x, y); each worker keeps one slide open.

    The references come from the batch sampler, which claims slides lazily in the main process, so
    the dataset needs no list of slides up front.
    """

    def __init__(self, size: int, mpp: float):
        self.size, self.mpp = size, mpp
        self._open: dict[int, object] = {}

    def _slide(self, k: int, path: str, mpp: float):
        s = self._open.get(k)
        if s is None:
            for old in list(self._open):  # keep one slide open per worker
                _close(self._open.pop(old))
            s = self._open[k] = _open_slide(path, mpp)
        return s

    def __getitem__(self, ref):
        import torch

        k, t, path, mpp, x, y = ref
        img, err = read_tile(self._slide(k, path, mpp), x, y, self.size, self.mpp)
        return torch.from_numpy(img), k, t, err


def _open_slide(path: str, mpp: float):
    """The slide, or the exception opening it raised (each of its tiles then fails with it)."""
    from hefeat.slides.reader import Slide

    try:
        return Slide(path, mpp=mpp)
    except Exception as e:
        return e


class InProcessTiles:
    """Batches (uint8 images, slide ks, tile ts, errors) read in this process, each split across `threads` threads,
    between forwards: the CPU reader.

    On the CPU the forward's threads already use every core. A DataLoader worker decoding at the same time
    preempts one of them, and the others wait for it at the forward's next barrier: on two cores the loop ran at
    0.82-0.88 of the bare encoder that way (benchmarks/README.md, rounds 17-18). Read between forwards, a batch costs
    its decode time divided by the threads (simplejpeg and OpenSlide decode without the GIL) and nothing more.
    A slide is opened once for all threads (hefeat.slides.reader.Slide reads from several threads; the direct
    reader decodes each JPEG tile once for all of them) and closed when the batches have moved past it.
    Same tiles, same errors, same order as the DataLoader's. It does not read ahead: `read_s` (wall) against
    `read_cpu_s` (the threads' CPU) says whether the reads waited on storage (see storage_note).
    """

    def __init__(self, batches, size: int, mpp: float, threads: int):
        self.batches, self.size, self.mpp, self.threads = batches, size, mpp, max(1, int(threads))
        self.read_s = 0.0  # wall seconds spent reading batches (slide opens included)
        self.read_cpu_s = 0.0  # CPU seconds the reading threads used for it

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        opened: dict[int, object] = {}
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hefeat-read") if self.threads > 1 else None
        try:
            for batch in self.batches:
                t0, c0 = time.perf_counter(), time.thread_time()
                ks = [r[0] for r in batch]
                here = set(ks)
                for k in [k for k in opened if k not in here]:  # slides come in order: one left behind is done
                    _close(opened.pop(k))
                for k, _t, path, mpp, _x, _y in batch:
                    if k not in opened:
                        opened[k] = _open_slide(path, mpp)
                out = np.empty((len(batch), self.size, self.size, 3), np.uint8)
                errs = [""] * len(batch)

                def read(a: int, b: int, out=out, errs=errs, batch=batch) -> float:
                    c = time.thread_time()
                    for i in range(a, b):
                        k, _t, _p, _m, x, y = batch[i]
                        out[i], errs[i] = read_tile(opened[k], x, y, self.size, self.mpp)
                    return time.thread_time() - c

                # contiguous runs of the scan order, so neighbouring tiles (which share JPEG tiles) stay on one thread
                step = -(-len(batch) // self.threads)
                spans = [(a, min(a + step, len(batch))) for a in range(0, len(batch), step)]
                if pool is None or len(spans) == 1:
                    read(0, len(batch))  # on this thread: counted below with the opens
                else:
                    self.read_cpu_s += sum(f.result() for f in [pool.submit(read, a, b) for a, b in spans])
                self.read_s += time.perf_counter() - t0
                self.read_cpu_s += time.thread_time() - c0
                yield (torch.from_numpy(out), torch.tensor(ks, dtype=torch.int64),
                       torch.tensor([r[1] for r in batch], dtype=torch.int64), errs)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            for s in opened.values():
                _close(s)


def _close(slide) -> None:
    if not isinstance(slide, BaseException):
        slide.close()


class ClaimingBatches:
    """The DataLoader's batch sampler: claims the next slide only when the loader asks for more tiles.

    Batches are full across slide boundaries (a slide's last tiles and the next slide's first share a
    batch); only the run's last batch may be short. Each reference carries its slide (k) and tile (t),
    so the loop splits a batch's rows back per slide.
    """

    def __init__(self, jobs: list, source, batch_size: int):
        self.jobs, self.source, self.batch_size = jobs, source, batch_size

    def __iter__(self):
        batch: list[tuple] = []
        for job in self.source:
            self.jobs.append(job)
            k = len(self.jobs) - 1
            xy = job.coords.tolist()
            t = 0
            while t < len(xy):
                take = min(self.batch_size - len(batch), len(xy) - t)
                batch.extend((k, i, job.path, job.mpp, xy[i][0], xy[i][1]) for i in range(t, t + take))
                t += take
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def segments(ks) -> list[tuple[int, int, int]]:
    """(slide k, first row, end row) of each run of equal slide indices in a batch, in order."""
    ks = ks.tolist() if hasattr(ks, "tolist") else [int(k) for k in ks]
    out, a = [], 0
    for i in range(1, len(ks) + 1):
        if i == len(ks) or ks[i] != ks[a]:
            out.append((ks[a], a, i))
            a = i
    return out


def worker_init(_):
    import torch

    torch.set_num_threads(1)


class Prefetched:
    """Iterates `items` in a background thread up to `depth` items ahead, in order; re-raises its error here.

    For device-decoded batches: the thread reads the next batch's JPEG bytes and queues its decode and cut
    while this thread waits for the forward on the device (the wait releases the GIL), so the CPU side of the
    decode overlaps the forward instead of adding to it. `close` stops the thread (and closes `items`).
    """

    _END = object()

    def __init__(self, items, depth: int = 2):
        import collections
        import threading

        self._items: collections.deque = collections.deque()
        self._depth = depth
        self._cv = threading.Condition()
        self._stop = False
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="hefeat-prefetch")
        self._thread.start()

    def _run(self, items) -> None:
        try:
            for x in items:
                if not self._put((x, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            self._put((None, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator stopped early leaves its `with` blocks (open slides) now, in its own thread

    def _put(self, item) -> bool:
        """Queue `item` once there is room; False if `close` came first."""
        with self._cv:
            self._cv.wait_for(lambda: self._stop or len(self._items) < self._depth)
            if self._stop:
                return False
            self._items.append(item)
            self._cv.notify_all()
            return True

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        with self._cv:
            self._cv.wait_for(lambda: self._items or self._stop)
            if not self._items:  # closed: nothing more will come
                self._done = True
                raise StopIteration
            x, err = self._items.popleft()
            self._cv.notify_all()
        if err is not None:
            self._done = True
            self.close()
            raise err
        if x is self._END:
            self._done = True
            raise StopIteration
        return x

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the item it is on)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
