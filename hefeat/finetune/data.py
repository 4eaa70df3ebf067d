"""Tiles read straight from the store's slides, epoch orders sharded by slide, and their DataLoaders.

A training sample is one tile (or spot patch) of a tiling: its slide, level-0 (x, y) and the
tiling's size and µm/px. The epoch order is a pure function of (seed, epoch, rank, world size), so
a resumed job replays exactly the batches an uninterrupted one would have seen, and augmentation
parameters come from the same counters (augment.py), never from a global random state.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat import fork_gc
from hefeat.errors import HefeatError


@dataclass(frozen=True)
class TileSource:
    """Where the pixels of every sample come from: per-slide files and per-sample positions."""

    slide_ids: tuple[str, ...]
    paths: tuple[str, ...]
    slide_mpp: tuple[float, ...]
    slide_of: np.ndarray  # (n,) index into slide_ids
    xy: np.ndarray  # (n, 2) level-0 top-left
    size: int
    mpp: float

    @classmethod
    def from_samples(cls, samples: pd.DataFrame, slides: pd.DataFrame, *, size: int, mpp: float) -> TileSource:
        """samples: slide_id, x, y per row; slides: the catalog rows (slide_id, path, mpp_x) of those slides."""
        ids = sorted(samples["slide_id"].unique())
        rows = slides.set_index("slide_id").loc[ids]
        pos = {s: i for i, s in enumerate(ids)}
        return cls(tuple(ids), tuple(rows["path"].astype(str)), tuple(rows["mpp_x"].astype(float)),
                   samples["slide_id"].map(pos).to_numpy(np.int64), samples[["x", "y"]].to_numpy(np.int64),
                   int(size), float(mpp))


class TileImages:
    """Map-style dataset: sample i -> (uint8 tensor (size, size, 3), i); keeps up to `max_open` slides open."""

    def __init__(self, source: TileSource, *, max_open: int = 64):
        self.src = source
        self.max_open = max_open
        self._open: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.src.slide_of)

    def close(self) -> None:
        """Close the open slides (before DataLoader workers fork: they must not share file handles)."""
        while self._open:
            self._open.popitem()[1].close()

    def _slide(self, k: int):
        from hefeat.slides.reader import Slide

        s = self._open.get(k)
        if s is None:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            s = self._open[k] = Slide(self.src.paths[k], mpp=self.src.slide_mpp[k])
        else:
            self._open.move_to_end(k)
        return s

    def __getitem__(self, i: int):
        import torch

        k = int(self.src.slide_of[i])
        x, y = self.src.xy[i]
        try:
            img = self._slide(k).read(float(x), float(y), self.src.size, self.src.mpp)
        except Exception as e:
            raise HefeatError(f"cannot read the tile at ({x}, {y}) of slide {self.src.slide_ids[k]}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        return torch.from_numpy(np.ascontiguousarray(img)), i


def shard_by_slide(slide_of: np.ndarray, idx: np.ndarray, world: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """Split sample indices `idx` into `world` shards of whole slides, balanced by tile count.

    Slides are shuffled by (seed, epoch) and each goes to the least-loaded shard, so over epochs every
    rank sees every slide, and within an epoch a rank opens only its own slides.
    """
    idx = np.asarray(idx, np.int64)
    if world == 1:
        return [idx]
    slides, counts = np.unique(slide_of[idx], return_counts=True)
    if len(slides) < world:
        raise HefeatError(f"{len(slides)} training slides cannot be sharded over {world} processes; "
                          "use fewer processes or more slides")
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(slides))
    load = np.zeros(world, np.int64)
    owner = {}
    for j in order:
        r = int(np.argmin(load))
        owner[int(slides[j])] = r
        load[r] += counts[j]
    rank_of = np.array([owner[int(s)] for s in slide_of[idx]])
    return [idx[rank_of == r] for r in range(world)]


def epoch_batches(slide_of: np.ndarray, train_idx: np.ndarray, *, global_batch: int, accumulate: int,
                  steps: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: steps * accumulate arrays of sample indices.

    The global batch (per optimiser step) is split over ranks and accumulation micro-batches; each
    rank draws its quota from a shuffled order of its own shard, wrapping with a fresh permutation
    when the shard is shorter than the quota.
    """
    micro = micro_batch_size(global_batch, accumulate, world)
    mine = shard_by_slide(slide_of, train_idx, world, seed=seed, epoch=epoch)[rank]
    need = steps * accumulate * micro
    rng = np.random.default_rng([seed, epoch, rank, 11])
    parts, have = [], 0
    while have < need:
        parts.append(mine[rng.permutation(len(mine))])
        have += len(mine)
    order = np.concatenate(parts)[:need]
    return [order[i:i + micro] for i in range(0, need, micro)]


def micro_batch_size(global_batch: int, accumulate: int, world: int) -> int:
    """Samples per forward pass on one rank; the global batch must split evenly."""
    if global_batch % (accumulate * world):
        raise HefeatError(f"batch_size {global_batch} must be divisible by accumulate x processes "
                          f"({accumulate} x {world}); change batch_size or accumulate")
    return global_batch // (accumulate * world)


def steps_per_epoch(n_train: int, global_batch: int, cap: int | None) -> int:
    """Optimiser steps per epoch: one pass over the training samples (ceil), or the recipe's cap."""
    return int(cap) if cap else max(1, -(-n_train // global_batch))


def eval_batches(slide_of: np.ndarray, idx: np.ndarray, batch: int, *, rank: int, world: int) -> list[np.ndarray]:
    """Evaluation batches of this rank: whole slides per rank (fixed assignment), in sample order."""
    idx = np.asarray(idx, np.int64)
    slides = np.unique(slide_of[idx])
    mine = idx[np.isin(slide_of[idx], slides[rank::world])]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def make_loader(dataset: TileImages, batches: list[np.ndarray], *, workers: int, pin: bool, seed: int):
    """A DataLoader over fixed batches; its own generator so loaders never touch the global RNG."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=workers, pin_memory=pin,
                      worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


class SwappableBatches:
    """A batch sampler whose batches are replaced between iterations (each epoch, each validation pass)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FoldLoader:
    """One DataLoader for a whole fold: persistent workers (started once, their open slides kept), fed a
    new list of batches per epoch. The batches are the same pure function of (seed, epoch, rank) as before
    and the workers draw no random numbers, so a resumed fold reads exactly the same samples."""

    def __init__(self, dataset: TileImages, *, workers: int, pin: bool, seed: int):
        import torch
        from torch.utils.data import DataLoader

        self.sampler = SwappableBatches()
        self._frozen = False
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin,
                                 worker_init_fn=_worker_init if workers else None,
                                 prefetch_factor=4 if workers else None,
                                 generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)

    def batches(self, batches: list[np.ndarray]):
        """An iterator over these batches, served by the fold's workers."""
        self.sampler.batches = [np.asarray(b).tolist() for b in batches]
        if self.loader.num_workers and not self._frozen:  # the workers fork now (hefeat.fork_gc)
            fork_gc.freeze()
            self._frozen = True
        return iter(self.loader)

    def close(self) -> None:
        """Stop the workers."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        if self._frozen:
            fork_gc.unfreeze()
            self._frozen = False
