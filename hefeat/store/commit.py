"""The commit protocol for per-slide outputs (tiles, features), and the one place that decides "done".

For one slide of one stage:
  1. the output is written to a temporary name, fsynced and renamed into place (`atomic_path`);
  2. the commit record status/<stage>=<key>/<sid>.json is written the same way, naming the output's
     size and content digest.

Readers see a slide only through its record (the views and `features_index` are built from the
records), so an output renamed into place without a record is invisible, and `is_done` says no:
the next run redoes the slide and overwrites it. A record whose output is missing or has another
size is not done either. A crash or a full disk at any step therefore leaves either the previous
state or a gap that the next run repairs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING

from hefeat.errors import HefeatError, NoTissueError
from hefeat.store import layout, records

if TYPE_CHECKING:  # pragma: no cover
    from hefeat.store.catalog import Store


def is_done(store: Store, stage: str, key: str, slide_id: str, *, input_digest: str | None = None) -> bool:
    """Whether a slide is finished for (stage, key): ok with its output in place, or skipped for good."""
    try:
        rec = records.read_record(layout.status_path(store.root, stage, key, slide_id))
    except records.MalformedRecord:
        return False
    if rec is None or rec["state"] == "failed":
        return False
    if input_digest and rec["input_digest"] and rec["input_digest"] != input_digest:
        return False  # computed from another version of its input (e.g. a slide re-ingested with a new MPP)
    if rec["state"] == "skipped":
        return True
    try:
        size = layout.output_path(store.root, stage, key, slide_id).stat().st_size
    except FileNotFoundError:
        return False
    return _intact(rec["size"], size)


def _intact(recorded_size, size: int) -> bool:
    """An output matches its record: the recorded size (when there is one) is the file's."""
    return recorded_size is None or recorded_size != recorded_size or int(recorded_size) == size  # NaN = unknown


def committed_outputs(store: Store, stage: str, key: str, slide_ids: list[str] | None = None
                      ) -> dict[str, os.stat_result]:
    """slide_id -> stat of each output with an ok record whose size it matches (or of `slide_ids` among them).

    What readers may see: an output renamed into place whose record was never written (a crash between
    the two) or that changed since is left out; the next run repairs it. A few slides are checked from
    their records directly, many from the store's bound record snapshot.
    """
    folder = str(layout.output_dir(store.root, stage, key))
    out = {}
    if slide_ids is not None and len(slide_ids) <= 256:
        rows = []
        for sid in slide_ids:
            rec = store.read_status(stage, key, sid)
            if rec is not None and rec["state"] == "ok":
                rows.append((sid, rec.get("size")))
    else:
        done = store.finished(stage, key)
        want = None if slide_ids is None else set(slide_ids)
        rows = [(sid, size) for sid, size in zip(done["slide_id"].tolist(), done["size"].tolist(), strict=True)
                if want is None or sid in want]
    for sid, size in rows:
        with contextlib.suppress(FileNotFoundError):  # paths as strings: 10,000 Path objects cost 0.3 s
            st = os.stat(os.path.join(folder, layout.output_name(stage, sid)))
            if _intact(size, st.st_size):
                out[sid] = st
    return out


def reason_of(exc: BaseException) -> tuple[str, str]:
    """(reason_code, message) for an exception that failed or skipped a slide."""
    code = getattr(exc, "reason_code", None)
    if isinstance(exc, NoTissueError):
        code = "no_tissue"
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        code = "disk_full"
    msg = str(exc) if isinstance(exc, HefeatError) else f"{type(exc).__name__}: {exc}"
    return code or "error", msg


def commit_ok(store: Store, stage: str, key: str, slide_id: str, *, n_tiles: int, seconds: float,
              digest: str | None, input_digest: str | None = None, **info) -> dict:
    """Record a slide whose output is already renamed into place (step 2 of the protocol)."""
    out = layout.output_path(store.root, stage, key, slide_id)
    rec = records.make_record(
        stage, key, slide_id, "ok", n_tiles=int(n_tiles), seconds=round(seconds, 4),
        tiles_per_s=round(n_tiles / seconds, 2) if seconds > 0 else None,
        path=str(out.relative_to(store.root)), size=out.stat().st_size, digest=digest, input_digest=input_digest,
        **info)
    records.write_record(store.root, rec)
    return rec


def commit_not_ok(store: Store, stage: str, key: str, slide_id: str, state: str, code: str, reason: str, *,
                  seconds: float, input_digest: str | None = None) -> dict:
    """Record a skipped or failed slide (its output, if any, stays invisible)."""
    rec = records.make_record(stage, key, slide_id, state, reason_code=code, reason=reason, n_tiles=0,
                              seconds=round(seconds, 4), input_digest=input_digest)
    records.write_record(store.root, rec)
    return rec
