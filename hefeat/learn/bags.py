"""The bag pipeline of slide-level multiple-instance learning: bags of tile embeddings streamed from the store.

A bag is one patient's tiles (all its labelled slides pooled) or one slide's. Tiles are read straight
from the feature files (float16 or float32 on disk, float32 in memory) through the store's offsets,
one bag at a time, never the whole extraction: with `max_tiles` a training bag is a fresh random
sample of at most that many tiles each epoch (seeded by seed, fold and epoch); evaluation reads a
bag's every tile up to `eval_max_tiles` (a fixed seeded sample beyond it). Bags whose stored bytes
fit `cache_bytes` are kept in memory (as stored) after their first read; bigger stores are read
again each epoch by a prefetching thread, so reading overlaps training.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Queue

import numpy as np

from hefeat.errors import HefeatError


@dataclass
class BagSet:
    """Bags: id (patient or slide), patient, their slides' feature files and tile counts."""

    ids: np.ndarray
    patients: np.ndarray
    slides: list[list[str]]
    files: list[list]  # SlideFile per slide of the bag
    dim: int
    n_tiles: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.n_tiles = np.array([sum(f.n for f in fs) for fs in self.files], np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def make_bags(store, extraction_id: str, ids: np.ndarray, patients: np.ndarray, slides: list[list[str]]) -> BagSet:
    """A BagSet over the store's feature files; a bag without tiles is a one-line error."""
    from hefeat.store.features import slide_table

    table = slide_table(store, extraction_id, sorted({s for ss in slides for s in ss}))
    by = {f.slide_id: f for f in table.files}
    files = [[by[s] for s in ss] for ss in slides]
    dims = {f.dim for f in table.files}
    bags = BagSet(np.asarray(ids).astype(str), np.asarray(patients).astype(str), slides, files,
                  int(dims.pop()) if dims else int(store.extraction(extraction_id)["dim"]))
    require_tiles(bags, extraction_id)
    return bags


def require_tiles(bags: BagSet, extraction_id: str) -> None:
    """A one-line error naming the bags without a single tile."""
    empty = np.flatnonzero(bags.n_tiles == 0)
    if len(empty):
        names = ", ".join(f"{bags.ids[i]} ({','.join(bags.slides[i])})" for i in empty[:5])
        raise HefeatError(f"{len(empty)} bag(s) have zero tiles in extraction {extraction_id}: {names}; re-tile those "
                          "slides (tissue detection found nothing) or leave them out of the label column")


def tile_sample(n: int, cap: int, rng: np.random.Generator | None) -> np.ndarray:
    """Sorted row indices of a bag: all n, or a random `cap` of them (rng None: all)."""
    if rng is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, cap, replace=False))


class BagReader:
    """Reads bags as float32 (rows sampled or all), checking every value is finite."""

    def __init__(self, bags: BagSet, *, cache_bytes: int = 1 << 30):
        self.bags = bags
        itemsize = max((np.dtype(f.dtype).itemsize for fs in bags.files for f in fs), default=4)
        self.cache = {} if int(bags.n_tiles.sum()) * bags.dim * itemsize <= cache_bytes else None
        self._lock = threading.Lock()

    def _stored(self, i: int) -> list[np.ndarray]:
        from hefeat.store.features import read_slide_rows

        got = self.cache.get(i) if self.cache is not None else None
        if got is None:
            got = [read_slide_rows(f, None, dtype=f.dtype) for f in self.bags.files[i]]
            if self.cache is not None:
                with self._lock:
                    self.cache[i] = got
        return got

    def read(self, i: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Bag i's rows (indices into the bag's concatenated tiles; None: all) as float32 (n, dim)."""
        from hefeat.store.features import read_slide_rows

        files = self.bags.files[i]
        n = int(self.bags.n_tiles[i])
        rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.bags.dim), np.float32)
        starts = np.cumsum([0] + [f.n for f in files])
        cached = self.cache is not None
        stored = self._stored(i) if cached else None
        for j, f in enumerate(files):
            a, b = np.searchsorted(rows, [starts[j], starts[j + 1]])
            if a == b:
                continue
            r = rows[a:b] - starts[j]
            if cached:
                np.copyto(out[a:b], stored[j][r] if len(r) < f.n else stored[j], casting="unsafe")
            else:
                read_slide_rows(f, None if len(r) == f.n else r, out=out[a:b])
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).any(1).sum())
            raise HefeatError(f"Bag {self.bags.ids[i]} (slides {', '.join(self.bags.slides[i])}) has {bad} tile(s) "
                              "with non-finite features (NaN or Inf); re-extract those slides (e.g. with "
                              "--precision fp32) before fitting")
        return out

    def batches(self, order: list[np.ndarray], rows_of) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(bag indices, their arrays) per batch of `order`, read ahead on one thread; rows_of(i) picks rows."""
        def load(batch):
            return batch, [self.read(int(i), rows_of(int(i))) for i in batch]

        if self.cache is not None and len(self.cache) == len(self.bags):
            for b in order:
                yield load(b)
            return
        q: Queue = Queue(maxsize=4)
        stop = threading.Event()

        def work():
            try:
                for b in order:
                    if stop.is_set():
                        return
                    q.put(("ok", load(b)))
                q.put(("end", None))
            except BaseException as e:  # handed to the consumer
                q.put(("err", e))

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                kind, v = q.get()
                if kind == "end":
                    return
                if kind == "err":
                    raise v
                yield v
        finally:
            stop.set()
            while t.is_alive():
                while not q.empty():
                    q.get_nowait()
                t.join(0.05)


def pad(arrays: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack bags (n_i, dim) into (b, T, dim) float32 with a boolean mask (b, T)."""
    T = max(1, max((len(a) for a in arrays), default=1))
    X = np.zeros((len(arrays), T, dim), np.float32)
    M = np.zeros((len(arrays), T), bool)
    for i, a in enumerate(arrays):
        X[i, :len(a)] = a
        M[i, :len(a)] = True
    return X, M
