"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

Temporary names carry host, process and thread, so two threads (the explorer server is threaded)
or two hosts sharing a store never write the same temporary file. Every step is a named
fault-injection point (`hefeat.store.faults`): `<kind>.write`, `<kind>.fsync`, `<kind>.rename`,
`<kind>.renamed`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hefeat.store import faults

TMP_MARK = ".tmp-"
_counter = itertools.count()


def tmp_path_for(path: Path) -> Path:
    """A temporary sibling of `path` unique to this host, process, thread and call."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{threading.get_native_id()}.{next(_counter)}"
    return path.with_name(f".{path.name}{TMP_MARK}{owner}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, kind: str = "file") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        faults.point(f"{kind}.write")
        yield tmp
        faults.point(f"{kind}.fsync")
        fsync_file(tmp)
        faults.point(f"{kind}.rename")
        os.replace(tmp, final)
        faults.point(f"{kind}.renamed")
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any, *, kind: str = "json") -> None:
    """Write JSON atomically."""
    blob = json.dumps(obj, indent=2, sort_keys=True, default=str)
    with atomic_path(path, kind=kind) as tmp:
        tmp.write_text(blob)


def write_json_once(path: str | os.PathLike, obj: Any, *, kind: str = "json") -> tuple[Any, bool]:
    """Write JSON to `path` only if nothing is there yet (atomic no-clobber); returns (what `path` holds, we_wrote).

    The complete file is hard-linked into place, so a reader sees either no file or all of it, and of
    two writers racing (two hosts sharing a store) exactly one wins and both return the winner's content.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(obj, indent=2, sort_keys=True, default=str)
    tmp = tmp_path_for(final)
    try:
        faults.point(f"{kind}.write")
        tmp.write_text(blob)
        fsync_file(tmp)
        faults.point(f"{kind}.rename")
        try:
            os.link(tmp, final)
        except FileExistsError:
            return read_json(final), False
        except OSError:  # a filesystem without hard links: exclusive create of the name, then replace
            try:
                fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return _read_settled(final), False
            os.close(fd)
            os.replace(tmp, final)
        faults.point(f"{kind}.renamed")
        fsync_dir(final.parent)
        return json.loads(blob), True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_settled(path: Path, tries: int = 50) -> Any:
    """JSON of a file another writer may still be filling (the exclusive-create fallback); waits briefly."""
    import time

    for _ in range(tries):
        with contextlib.suppress(ValueError, OSError):
            return read_json(path)
        time.sleep(0.1)
    return read_json(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary file name made by tmp_path_for, or None."""
    owner = name.rsplit(TMP_MARK, 1)[-1]
    parts = owner.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folder: Path) -> int:
    """Remove temporary files left by dead processes of this host; returns how many."""
    host = socket.gethostname()
    n = 0
    if not folder.exists():
        return 0
    for p in folder.glob(f".*{TMP_MARK}*"):
        who = _owner(p.name)
        if who is None or who[0] != host or pid_alive(who[1]):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n
