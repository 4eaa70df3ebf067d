"""Per-slide claims: lock files that are complete when they appear and go stale when their holder dies.

A claim is created by hard-linking a fully written temporary file to the lock name (atomic, also on
NFS), so no worker ever reads a half-written lock. Its holder touches it every HEARTBEAT_S seconds;
a lock is stale when its holder is a dead process on this host, or when nobody touched it for
STALE_AFTER_S seconds (a holder on another host, e.g. a requeued cluster job, or a file whose
owner cannot be read — an empty lock is never stolen while it is fresh). Taking over a stale lock
renames it aside first, so two workers cannot both take it. A claim is any path: fine-tuning jobs
claim each fold and their commit with the same class (hefeat.finetune.job).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from hefeat.store.atomic import pid_alive, tmp_path_for

STALE_AFTER_S = float(os.environ.get("HEFEAT_LOCK_STALE_S", "600"))
HEARTBEAT_S = max(1.0, STALE_AFTER_S / 10)


def lock_state(path: Path, *, stale_after: float | None = None) -> dict | None:
    """Holder, age and staleness of a lock file (None if there is none)."""
    stale_after = STALE_AFTER_S if stale_after is None else stale_after
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text, st = "", None
    age = time.time() - st.st_mtime if st else 0.0
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            holder = {}
    except ValueError:
        holder = {}
    host, pid = holder.get("host"), holder.get("pid")
    out = {"host": host, "pid": pid, "started": holder.get("started"), "age_s": round(age, 1),
           "ino": st.st_ino if st else None, "stale": False, "why": "held"}
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        out.update(stale=True, why=f"holder process {pid} on this host is gone")
    elif age > stale_after:
        who = f"{host}:{pid}" if host else "an unknown holder"
        out.update(stale=True, why=f"no heartbeat from {who} for {age:.0f} s")
    return out


class _Heartbeat(threading.Thread):
    """Touches every held claim of this process so that other hosts see it alive."""

    def __init__(self):
        super().__init__(daemon=True, name="hefeat-lock-heartbeat")
        self.held: set[Path] = set()
        self.mutex = threading.Lock()

    def run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.mutex:
                paths = list(self.held)
            for p in paths:
                with contextlib.suppress(OSError):
                    os.utime(p)


_heartbeat: _Heartbeat | None = None
_hb_lock = threading.Lock()


def _beat(path: Path, on: bool) -> None:
    global _heartbeat
    with _hb_lock:
        if _heartbeat is None:
            _heartbeat = _Heartbeat()
            _heartbeat.start()
    with _heartbeat.mutex:
        (_heartbeat.held.add if on else _heartbeat.held.discard)(path)


def clean_stale_locks(folder: Path) -> int:
    """Remove the stale lock files of one stage folder (left by killed or vanished workers); returns how many."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.glob("*.lock"):
        st = lock_state(p)
        if st is not None and st["stale"]:
            SlideClaim(p)._take_over(st["ino"])
            n += 1
    return n


class SlideClaim:
    """An exclusive claim on one slide of one stage, so concurrent workers never do a slide twice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False

    def _create(self) -> bool:
        tmp = tmp_path_for(self.path)
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "thread": threading.get_native_id(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _take_over(self, ino: int | None) -> None:
        """Move a stale lock aside; if what moved is not the lock judged stale, put it back."""
        aside = tmp_path_for(self.path.with_name(self.path.name + ".stale"))
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if ino is not None and os.stat(aside).st_ino != ino:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()

    def acquire(self) -> bool:
        """Take the claim; a stale one (see module doc) is taken over. False if another worker holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                self.held = True
                _beat(self.path, True)
                return True
            st = lock_state(self.path)
            if st is not None and not st["stale"]:
                return False
            if st is not None:
                self._take_over(st["ino"])
        return False

    def release(self) -> None:
        """Remove the claim if we hold it."""
        if self.held:
            _beat(self.path, False)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False
