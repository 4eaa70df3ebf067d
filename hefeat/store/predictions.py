"""A model's per-slide predictions, written as one commit: readers see the old set or the new one.

predictions/model=<mid> is a symbolic link to one generation folder,
predictions/.generations/<mid>/<pid>-<token>/slide=<sid>.parquet. `write_predictions` writes a
new generation (each file atomically), carries over the slides it did not rewrite (hard links),
then swaps the link with one rename: that rename is the commit. A kill or a full disk at any step
before it leaves the previous generation in place (the half-written one is invisible and removed
by the next writer); after it, the new one. The model's own record (index.json, hefeat.store.models)
is written after its predictions, so a model being fitted is never listed with predictions missing.

A model-level table computed with the predictions (slide_predictions: one row per slide) is written
into the same generation (`write.table`), so it is committed by the same rename; the model's
folder holds a link to it through predictions/model=<mid> (models/<mid>/<name>.parquet ->
../../predictions/model=<mid>/table=<name>.parquet), made before the swap. Readers therefore see
the old tile predictions with the old table or the new with the new, never one without the other.

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
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from hefeat.store import faults, layout
from hefeat.store.atomic import fsync_dir, pid_alive
from hefeat.store.catalog import Store
from hefeat.store.tables import write_parquet

LEGACY = "legacy"


class PredictionWriter:
    """What `write_predictions` yields: call it with (slide_id, frame); `.table(name, frame)` for a model table."""

    def __init__(self, gen: Path):
        self.gen = gen
        self.written: set[str] = set()
        self.tables: dict[str, tuple[str, str]] = {}  # file name -> (table name, key column)

    def __call__(self, slide_id: str, df: pd.DataFrame) -> Path:
        """Write one slide's predictions into the new generation."""
        p = layout.predictions_file_in(self.gen, slide_id)
        write_parquet(df, p, kind="predictions")
        self.written.add(p.name)
        return p

    def table(self, name: str, df: pd.DataFrame, *, key: str = "slide_id") -> Path:
        """Write a model-level table (one row per `key`) committed with the predictions.

        With keep=True, rows of the current table whose key is not in `df` are carried over, like the
        slides that were not predicted again.
        """
        p = layout.predictions_table_in(self.gen, name)
        write_parquet(df, p, kind="predictions.table")
        self.written.add(p.name)
        self.tables[p.name] = (name, key)
        return p


@contextlib.contextmanager
def write_predictions(store: Store, mid: str, *, keep: bool = True) -> Iterator[PredictionWriter]:
    """Yield write(slide_id, frame) (and write.table(name, frame)); on a clean exit commit them all at once.

    keep: slides of the current generation that were not rewritten stay (a predict on some slides);
    keep=False makes the written slides the whole set (a fit). On an exception nothing changes.
    """
    root = store.root
    gens = layout.predictions_generations(root, mid)
    _recover(root, mid)
    gen = gens / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    gen.mkdir(parents=True)
    write = PredictionWriter(gen)
    try:
        yield write
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    link = layout.predictions_dir(root, mid)
    old = _current(root, mid)
    for table, _ in write.tables.values():
        _adopt_plain_table(root, mid, table, old)
    if keep and old is not None:
        for e in os.scandir(old):
            if layout.is_predictions_file(e.name) and e.name not in write.written:
                faults.point("predictions.carry")
                _carry(e.path, gen / e.name)
            elif layout.is_predictions_table(e.name):
                faults.point("predictions.carry")
                if e.name not in write.written:
                    _carry(e.path, gen / e.name)
                else:
                    _merge_table(Path(e.path), gen / e.name, write.tables[e.name][1])
    tables = [n for n in os.listdir(gen) if layout.is_predictions_table(n)]
    fsync_dir(gen)
    for name in tables:
        _link_table(root, mid, name, old)
    faults.point("predictions.swap")
    _swap(link, gen)
    faults.point("predictions.swapped")
    _clean(root, mid, keep=gen)


def _carry(src: str, dst: Path) -> None:
    """A file of the current generation into the new one (hard link, else a copy)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merge_table(old: Path, new: Path, key: str) -> None:
    """Add the current table's rows whose key the new table lacks (slides not predicted again)."""
    prev = pd.read_parquet(old)
    cur = pd.read_parquet(new)
    if key not in prev.columns or key not in cur.columns:
        return
    rest = prev[~prev[key].isin(cur[key])]
    if len(rest):
        both = pd.concat([cur, rest], ignore_index=True).sort_values(key, kind="stable", ignore_index=True)
        write_parquet(both, new, kind="predictions.table")


def _adopt_plain_table(root: Path, mid: str, table: str, old: Path | None) -> None:
    """A table written before tables moved into the generations (a plain file in models/<mid>/) is
    hard-linked into the current generation: readers see the same table through the link to come,
    and a predict on some slides carries its other rows."""
    dest = layout.model_table_path(root, mid, table)
    name = layout.predictions_table_in(Path(), table).name
    if old is not None and dest.is_file() and not dest.is_symlink() and not (old / name).exists():
        _carry(str(dest), old / name)


def _link_table(root: Path, mid: str, name: str, old: Path | None) -> None:
    """models/<mid>/<table>.parquet as a link through predictions/model=<mid> (made before the swap).

    Until the swap the link resolves to the current generation's table (or to nothing), so readers
    see the old table with the old predictions.
    """
    table = name[len("table="):-len(layout.TABLE_SUFFIX)]
    dest = layout.model_table_path(root, mid, table)
    target = os.path.relpath(layout.predictions_dir(root, mid) / name, dest.parent)
    if dest.is_symlink() and os.readlink(dest) == target:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    faults.point("predictions.table.link")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


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
