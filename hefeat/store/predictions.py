"""A model's per-slide predictions, written as one commit: readers see the old set or the new one.

predictions/model=<mid> is a symbolic link to one generation folder,
predictions/.generations/<mid>/<pid>-<token>/slide=<sid>.parquet. `write_predictions` writes a
new generation (each file atomically), carries over the slides it did not rewrite (hard links),
then swaps the link with one rename: that rename is the commit. A kill or a full disk at any step
before it leaves the previous generation in place (the half-written one is invisible and removed
by the next writer); after it, the new one. The model's own record (index.json, hefeat.store.models)
is written after its predictions, so a model being fitted is never listed with predictions missing.

Readers need nothing special: paths through the link (layout.predictions_path) resolve to the
current generation. A store written before generations (a plain folder) is moved into one on its
first write (a crash inside that one move leaves the folder under .generations; the next write
restores it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from hefeat.store import faults, layout
from hefeat.store.atomic import fsync_dir, pid_alive
from hefeat.store.catalog import Store
from hefeat.store.tables import write_parquet

LEGACY = "legacy"


@contextlib.contextmanager
def write_predictions(store: Store, mid: str, *, keep: bool = True) -> Iterator[Callable[[str, pd.DataFrame], Path]]:
    """Yield write(slide_id, frame); on a clean exit commit every written slide at once.

    keep: slides of the current generation that were not rewritten stay (a predict on some slides);
    keep=False makes the written slides the whole set (a fit). On an exception nothing changes.
    """
    root = store.root
    gens = layout.predictions_generations(root, mid)
    _recover(root, mid)
    gen = gens / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    gen.mkdir(parents=True)
    written: set[str] = set()

    def write(slide_id: str, df: pd.DataFrame) -> Path:
        p = layout.predictions_file_in(gen, slide_id)
        write_parquet(df, p, kind="predictions")
        written.add(p.name)
        return p

    try:
        yield write
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    link = layout.predictions_dir(root, mid)
    old = _current(root, mid)
    if keep and old is not None:
        for e in os.scandir(old):
            if e.name not in written and layout.is_predictions_file(e.name):
                faults.point("predictions.carry")
                try:
                    os.link(e.path, gen / e.name)
                except OSError:
                    shutil.copy2(e.path, gen / e.name)
    fsync_dir(gen)
    faults.point("predictions.swap")
    _swap(link, gen)
    faults.point("predictions.swapped")
    _clean(root, mid, keep=gen)


def discard_predictions(store: Store, mid: str) -> None:
    """Remove a model's predictions (the link first, so readers never see part of them)."""
    link = layout.predictions_dir(store.root, mid)
    if link.is_symlink():
        link.unlink()
    else:
        shutil.rmtree(link, ignore_errors=True)
    shutil.rmtree(layout.predictions_generations(store.root, mid), ignore_errors=True)


def _current(root: Path, mid: str) -> Path | None:
    """The generation readers see now (a pre-generation plain folder counts), or None."""
    link = layout.predictions_dir(root, mid)
    return link.resolve() if link.exists() else None


def _swap(link: Path, gen: Path) -> None:
    """Point `link` at `gen` with one rename (a plain legacy folder is first moved into a generation)."""
    if link.exists() and not link.is_symlink():  # written before generations: move it in (one-time)
        os.rename(link, gen.parent / LEGACY)
    tmp = link.with_name(f".{link.name}.{gen.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(gen, link.parent), tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def _recover(root: Path, mid: str) -> None:
    """Restore a legacy folder a crash left mid-move, so its slides are carried into the next generation."""
    link = layout.predictions_dir(root, mid)
    legacy = layout.predictions_generations(root, mid) / LEGACY
    if not link.exists() and not link.is_symlink() and legacy.is_dir():
        os.rename(legacy, link)


def _clean(root: Path, mid: str, keep: Path) -> None:
    """Remove superseded generations and those a dead writer left (another live writer's stay)."""
    gens = layout.predictions_generations(root, mid)
    for e in os.scandir(gens):
        if e.path == str(keep) or not e.is_dir():
            continue
        pid = e.name.split("-", 1)[0]
        if e.name == LEGACY or not pid.isdigit() or int(pid) == os.getpid() or not pid_alive(int(pid)):
            shutil.rmtree(e.path, ignore_errors=True)
