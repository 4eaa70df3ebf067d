"""The per-slide runner: skip-if-done, claim one slide at a time, record ok/skipped/failed, clean up.

Tiling, extraction and HDF5 import all run through `SlideRunner`. It asks `commit.is_done` (the one
place that decides "done"), claims a slide only when the caller is ready for it (so several
unsharded workers share a cohort), records each outcome through the commit protocol, and releases
every claim it still holds in `close()` (also on Ctrl-C). `run_slides` is the synchronous loop for
steps that do one slide per call; extraction drives the same runner from its reader and writer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from hefeat.errors import HefeatError, NoTissueError
from hefeat.store import commit, layout
from hefeat.store.catalog import Store
from hefeat.store.locks import SlideClaim, clean_stale_locks, lock_state

__all__ = ["RunSummary", "SlideClaim", "SlideRunner", "SlideTask", "run_slides", "shard_slides"]


@dataclass
class RunSummary:
    """Counts and timings of a per-slide run."""

    stage: str
    run_key: str
    ok: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        """Tiles processed per second of wall time."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 when slides were asked for and none is finished (all failed or busy), else 0."""
        attempted = self.ok or self.done or self.skipped or self.failed or self.busy
        return 1 if attempted and not (self.ok or self.done or self.skipped) else 0

    def merge(self, other: RunSummary | dict) -> None:
        """Add another worker's summary of the same stage and id (e.g. one Ray shard)."""
        d = other if isinstance(other, dict) else {k: getattr(other, k) for k in
                                                    ("run_key", "ok", "done", "skipped", "failed", "busy", "tiles", "seconds")}
        self.run_key = d["run_key"] or self.run_key
        self.ok += d["ok"]
        self.done += d["done"]
        self.skipped.update(d["skipped"])
        self.failed.update(d["failed"])
        self.busy.update(d["busy"])
        self.tiles += d["tiles"]
        self.seconds = max(self.seconds, d["seconds"])

    def to_dict(self) -> dict:
        """Summary for --json."""
        return {
            "stage": self.stage, "id": self.run_key, "ok": len(self.ok), "already_done": len(self.done),
            "skipped": self.skipped, "failed": self.failed, "busy": self.busy, "tiles": self.tiles,
            "seconds": round(self.seconds, 3), "tiles_per_s": round(self.tiles_per_s, 2),
            "exit_code": self.exit_code, **self.extra,
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


@dataclass
class SlideTask:
    """One claimed slide: its id, its claim, when it started, what its output is computed from."""

    slide_id: str
    claim: SlideClaim
    input_digest: str | None = None
    start: float = field(default_factory=time.perf_counter)
    finished: bool = False


class SlideRunner:
    """Claims, skips and records the slides of one stage and id (thread-safe: a writer thread may record)."""

    def __init__(self, store: Store, stage: str, key: str, *, fail_fast: bool = False,
                 input_digest: Callable[[str], str | None] | None = None):
        self.store, self.stage, self.key, self.fail_fast = store, stage, key, fail_fast
        self.input_digest = input_digest or (lambda sid: None)
        self.summary = RunSummary(stage, key)
        self._held: dict[str, SlideTask] = {}
        self._mutex = threading.Lock()
        self._t0 = time.perf_counter()
        clean_stale_locks(layout.status_dir(store.root, stage, key))

    def __enter__(self) -> SlideRunner:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and (self.summary.ok or self.summary.failed or self.summary.skipped):
            self.store.compact_after_write(self.stage, self.key)  # readers never compact: the writer does

    def claimed(self, slide_ids: Iterable[str]) -> Iterator[SlideTask]:
        """Yield each slide not done yet that this worker could claim, one at a time, as the caller asks."""
        for sid in slide_ids:
            want = self.input_digest(sid)
            if commit.is_done(self.store, self.stage, self.key, sid, input_digest=want):
                self.summary.done.append(sid)
                continue
            claim = SlideClaim(layout.lock_path(self.store.root, self.stage, self.key, sid))
            if not claim.acquire():
                st = lock_state(claim.path) or {}
                self.summary.busy[sid] = f"claimed by {st.get('host')}:{st.get('pid')} for {st.get('age_s', 0):.0f} s"
                continue
            if commit.is_done(self.store, self.stage, self.key, sid, input_digest=want):  # finished meanwhile
                claim.release()
                self.summary.done.append(sid)
                continue
            task = SlideTask(sid, claim, want)
            with self._mutex:
                self._held[sid] = task
            yield task

    def _finish(self, task: SlideTask) -> float:
        task.finished = True
        with self._mutex:
            self._held.pop(task.slide_id, None)
        task.claim.release()
        return time.perf_counter() - task.start

    def ok(self, task: SlideTask, *, n_tiles: int, digest: str | None, **info) -> bool:
        """Commit a slide whose output is in place (writes its record, releases its claim); False if not recorded."""
        try:
            commit.commit_ok(self.store, self.stage, self.key, task.slide_id, n_tiles=n_tiles,
                             seconds=time.perf_counter() - task.start, digest=digest,
                             input_digest=task.input_digest, **info)
        except Exception as e:
            self.fail(task, e)
            return False
        self._finish(task)
        with self._mutex:
            self.summary.ok.append(task.slide_id)
            self.summary.tiles += int(n_tiles)
        return True

    def fail(self, task: SlideTask, exc: BaseException | str, *, code: str | None = None) -> None:
        """Record a failed (or, for NoTissueError, skipped) slide; a full disk stops the whole run."""
        if isinstance(exc, str):
            c, msg = code or "error", exc
        else:
            c, msg = commit.reason_of(exc)
        state = "skipped" if isinstance(exc, NoTissueError) else "failed"
        sec = time.perf_counter() - task.start
        record_error = None
        try:
            commit.commit_not_ok(self.store, self.stage, self.key, task.slide_id, state, c, msg, seconds=sec,
                                 input_digest=task.input_digest)
        except OSError as e:  # the record cannot be written either (typically the same full disk)
            record_error = e
            if c != "disk_full":
                c, msg = commit.reason_of(e)
        self._finish(task)
        with self._mutex:
            (self.summary.skipped if state == "skipped" else self.summary.failed)[task.slide_id] = msg
        if c == "disk_full":
            raise HefeatError(f"{self.stage} stopped: the disk is full ({msg}) at slide {task.slide_id}. "
                              "Free space and run the command again; finished slides are kept.") from None
        if record_error is not None:
            raise HefeatError(f"{self.stage}: cannot record slide {task.slide_id} ({record_error})") from None
        if self.fail_fast and state == "failed":
            raise HefeatError(f"{self.stage} failed on slide {task.slide_id}: {msg}")

    def close(self) -> None:
        """Release every claim still held (slides left unfinished stay not done) and stop the clock."""
        with self._mutex:
            left = list(self._held.values())
            self._held.clear()
        for t in left:
            t.claim.release()
        self.summary.seconds = time.perf_counter() - self._t0


def run_slides(
    store: Store,
    stage: str,
    run_key: str,
    slide_ids: list[str],
    step: Callable[[SlideTask], dict],
    *,
    fail_fast: bool = False,
    progress: bool = False,
    desc: str | None = None,
    input_digest: Callable[[str], str | None] | None = None,
    after_ok: Callable[[SlideTask, dict], None] | None = None,
) -> RunSummary:
    """Run `step(task)` for every slide not done yet; record each outcome.

    `step` writes the slide's output atomically to its layout path and returns at least n_tiles and
    digest. NoTissueError marks the slide skipped with its reason; any other error marks it failed
    and the batch goes on (unless fail_fast); a full disk stops the batch. `after_ok(task, info)`
    runs once a slide's record is written (decode-once extracts the slide it has just tiled).
    """
    from tqdm import tqdm

    bar = tqdm(slide_ids, disable=not progress, desc=desc or stage, unit="slide")
    with SlideRunner(store, stage, run_key, fail_fast=fail_fast, input_digest=input_digest) as runner:
        try:
            for task in runner.claimed(bar):
                try:
                    info = dict(step(task) or {})
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    runner.fail(task, e)
                    continue
                n_tiles, digest = int(info.pop("n_tiles", 0)), info.pop("digest", None)
                extra = info.pop("_after", None)  # what the step hands to after_ok, not recorded
                if runner.ok(task, n_tiles=n_tiles, digest=digest, **info) and after_ok is not None:
                    after_ok(task, {"n_tiles": n_tiles, "digest": digest, **info, "_after": extra})
        finally:
            bar.close()
    return runner.summary
