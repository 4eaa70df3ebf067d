"""The per-slide runner: skip-if-done, claim, error capture with a reason, timing, cleanup."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hefeat.errors import HefeatError, NoTissueError
from hefeat.store.catalog import Store
from hefeat.store.runs import timestamp


@dataclass
class RunSummary:
    """Counts and timings of a per-slide run."""

    stage: str
    run_key: str
    ok: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    tiles: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        """Tiles processed per second of wall time."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """Summary for --json."""
        return {
            "stage": self.stage, "id": self.run_key, "ok": len(self.ok), "already_done": len(self.done),
            "skipped": self.skipped, "failed": self.failed, "busy": self.busy, "tiles": self.tiles,
            "seconds": round(self.seconds, 3), "tiles_per_s": round(self.tiles_per_s, 2), **self.extra,
        }


def shard_slides(slide_ids: list[str], shard: str | None) -> list[str]:
    """This process's share of slides for --shard I/N (1-based; slides sorted, then round-robin)."""
    if not shard:
        return list(slide_ids)
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise HefeatError(f"--shard expects I/N like 3/16, got {shard!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise HefeatError(f"--shard {shard}: expected I/N with 1 <= I <= N")
    return [s for k, s in enumerate(sorted(slide_ids)) if k % n == i - 1]


class SlideClaim:
    """An exclusive per-slide lock file (O_EXCL) so concurrent workers never do a slide twice."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        """Take the lock; a lock left by a dead process on this host is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                self.held = True
                return True
            except FileExistsError:
                if not self._stale():
                    return False
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        return False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        """Remove the lock if we hold it."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def run_slides(
    store: Store,
    stage: str,
    run_key: str,
    slide_ids: list[str],
    step: Callable[[str], dict],
    *,
    is_done: Callable[[str], bool],
    fail_fast: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> RunSummary:
    """Run `step(slide_id)` for every slide not done yet; record a status row per slide.

    `step` returns a dict with at least n_tiles. NoTissueError marks the slide skipped with its
    reason; any other error marks it failed and the batch goes on (unless fail_fast).
    """
    from tqdm import tqdm

    summary = RunSummary(stage, run_key)
    t0 = time.perf_counter()
    bar = tqdm(slide_ids, disable=not progress, desc=desc or stage, unit="slide")
    try:
        for sid in bar:
            if is_done(sid):
                summary.done.append(sid)
                continue
            claim = SlideClaim(store.status_dir(stage, run_key) / f"{sid}.lock")
            if not claim.acquire():
                summary.busy.append(sid)
                continue
            t = time.perf_counter()
            try:
                if is_done(sid):  # finished by another worker between the check and the claim
                    summary.done.append(sid)
                    continue
                info = step(sid) or {}
                sec = time.perf_counter() - t
                n = int(info.get("n_tiles", 0))
                store.write_status(stage, run_key, sid, {
                    "state": "ok", "reason": None, "seconds": round(sec, 4), "n_tiles": n,
                    "tiles_per_s": round(n / sec, 2) if sec > 0 else None, "finished_at": timestamp(), **info,
                })
                summary.ok.append(sid)
                summary.tiles += n
            except NoTissueError as e:
                store.write_status(stage, run_key, sid, {
                    "state": "skipped", "reason": f"no tissue: {e}", "seconds": round(time.perf_counter() - t, 4),
                    "n_tiles": 0, "finished_at": timestamp()})
                summary.skipped[sid] = f"no tissue: {e}"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                msg = str(e) if isinstance(e, HefeatError) else f"{type(e).__name__}: {e}"
                store.write_status(stage, run_key, sid, {
                    "state": "failed", "reason": msg, "seconds": round(time.perf_counter() - t, 4),
                    "n_tiles": 0, "finished_at": timestamp()})
                summary.failed[sid] = msg
                if fail_fast:
                    raise HefeatError(f"{stage} failed on slide {sid}: {msg}") from e
            finally:
                claim.release()
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary

