"""A running fine-tuning job's heartbeat, and the job state read from it (done / running / stopped).

While a job trains, its main process rewrites jobs/<job_id>/heartbeat.json (host, pid, time) every
`EVERY_S` seconds from a background thread, and marks it ended when the run returns or raises. A
reader then tells a job that is training from one that was killed mid-run (whose job.json still says
"running"): the heartbeat ended, or its process is gone (same host), or it is older than `STALE_S`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from hefeat.store import layout
from hefeat.store.atomic import pid_alive, read_json, write_json

EVERY_S = 30.0
STALE_S = 300.0  # no beat for this long (another host, where the process cannot be checked): stopped
STATES = ("done", "running", "stopped", "unknown")

_local = threading.local()


class _Beat(threading.Thread):
    def __init__(self, path: Path, every: float):
        super().__init__(daemon=True, name="hefeat-finetune-heartbeat")
        self.path, self.every = path, every
        self.stop = threading.Event()
        self.started_at = time.time()

    def write(self, ended: str | None = None) -> None:
        with contextlib.suppress(OSError):  # a missed beat must not stop training
            write_json(self.path, {"host": socket.gethostname(), "pid": os.getpid(), "beat": time.time(),
                                   "started": self.started_at, "every_s": self.every, "ended": ended})

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.write()


@contextlib.contextmanager
def session():
    """Scope of one job run: a heartbeat started inside (`start`) is ended when the scope exits, however it exits."""
    prev = getattr(_local, "beats", None)
    _local.beats = []
    try:
        yield
    except BaseException as e:
        for b in _local.beats:
            b.stop.set()
            b.write(ended=f"{type(e).__name__}: {e}"[:300])
        raise
    else:
        for b in _local.beats:
            b.stop.set()
            b.write(ended="returned")
    finally:
        _local.beats = prev


def start(root: Path, job_id: str, every: float = EVERY_S) -> None:
    """Start beating for `job_id` (main process only) until the enclosing `session` ends."""
    b = _Beat(layout.job_heartbeat_path(root, job_id), every)
    b.write()
    b.start()
    beats = getattr(_local, "beats", None)
    if beats is not None:
        beats.append(b)


def job_state(root: Path, job: dict, *, now: float | None = None) -> tuple[str, str]:
    """(state, why) of a job from its record and heartbeat: done | running | stopped | unknown."""
    if job.get("status") == "finished":
        return "done", "finished"
    p = layout.job_heartbeat_path(root, job["job_id"])
    try:
        hb = read_json(p)
    except (OSError, ValueError):
        return "unknown", "no heartbeat (a job started before heartbeats were written)"
    now = time.time() if now is None else now
    age = now - float(hb.get("beat", 0))
    if hb.get("ended"):
        return "stopped", f"ended without finishing ({hb['ended']})"
    if hb.get("host") == socket.gethostname() and not pid_alive(int(hb.get("pid", -1))):
        return "stopped", f"its process {hb.get('pid')} is gone (last beat {age:.0f} s ago)"
    if age > max(STALE_S, 4 * float(hb.get("every_s", EVERY_S))):
        return "stopped", f"no heartbeat for {age:.0f} s (from {hb.get('host')})"
    return "running", f"last beat {age:.0f} s ago from {hb.get('host')} pid {hb.get('pid')}"
