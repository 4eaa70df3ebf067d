"""Per-slide commit records (status/<stage>=<key>/<sid>.json) and their compacted table.

A worker writes one small JSON record per slide, atomically, after the slide's output is in place;
that record is the commit. Reading tens of thousands of them on every query is what broke the first
catalog, so `load_status` keeps a compacted copy (compact/status/part-*.parquet + manifest) and
re-reads only the record folders whose directory mtime changed since. Every record is parsed
against the fixed schema (`schema.STATUS_FIELDS`); a malformed file is reported, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hefeat.store import layout
from hefeat.store.atomic import atomic_path, fsync_dir, write_json
from hefeat.store.schema import STATES, STATUS_FIELDS

FAMILY = "status"
#: A folder modified less than this long ago is re-read next time (mtime granularity, clock steps).
SETTLE_NS = 2_000_000_000
#: Folders with at least this many records are compacted settled (readers skip per-file stats).
SETTLE_MIN_ROWS = 1000
_INT = {"BIGINT", "INTEGER"}


class MalformedRecord(ValueError):
    """A record file that is not a valid commit record."""


def _coerce(name: str, typ: str, v: Any) -> Any:
    if v is None:
        return None
    if typ in _INT:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise MalformedRecord(f"{name} must be an integer, got {v!r}")
        return int(v)
    if typ == "DOUBLE":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MalformedRecord(f"{name} must be a number, got {v!r}")
        return float(v)
    return str(v)


def make_record(stage: str, key: str, slide_id: str, state: str, **fields: Any) -> dict:
    """A complete record: every schema field present (None when unknown); other fields go into `info`."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    rec = dict.fromkeys(STATUS_FIELDS)
    rec.update(stage=stage, id=key, slide_id=slide_id, state=state, host=socket.gethostname(), pid=os.getpid(),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    extra = {}
    for k, v in fields.items():
        if k in STATUS_FIELDS:
            rec[k] = v
        elif v is not None:
            extra[k] = v
    if extra:
        rec["info"] = json.dumps(extra, sort_keys=True, default=str)
    return rec


def parse_record(blob: bytes | str) -> dict:
    """A record checked against the schema (extra keys of old records are folded into `info`)."""
    try:
        raw = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRecord(f"not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MalformedRecord("not a JSON object")
    rec, extra = {}, {}
    for k, v in raw.items():
        if k not in STATUS_FIELDS:
            extra[k] = v
    for name, typ in STATUS_FIELDS.items():
        rec[name] = _coerce(name, typ, raw.get(name))
    for need in ("stage", "id", "slide_id", "state"):
        if not rec[need]:
            raise MalformedRecord(f"missing {need}")
    if rec["state"] not in STATES:
        raise MalformedRecord(f"state {rec['state']!r} is not one of {', '.join(STATES)}")
    if extra and rec["info"] is None:
        rec["info"] = json.dumps(extra, sort_keys=True, default=str)
    return rec


def read_record(path: Path) -> dict | None:
    """The record at `path`, None if there is none; MalformedRecord if it is unreadable."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_record(blob)


def write_record(root: Path, rec: dict) -> Path:
    """Write a record atomically (fault points record.write/fsync/rename/renamed)."""
    p = layout.status_path(root, rec["stage"], rec["id"], rec["slide_id"])
    write_json(p, rec, kind="record")
    return p


# -- the compacted status table -------------------------------------------------------------
@dataclass
class StatusSnapshot:
    """All commit records (columns of STATUS_FIELDS), the malformed files and the lock files seen."""

    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in STATUS_FIELDS})
    malformed: list[dict] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    reread: int = 0
    rows_kept: int = 0

    def to_arrow(self):
        """The records as a pyarrow Table with the fixed schema."""
        import pyarrow as pa

        types = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
                 "TIMESTAMP": pa.string()}
        return pa.table({k: pa.array(v, type=types[STATUS_FIELDS[k]]) for k, v in self.columns.items()})


def _part_rows(part: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(part).to_pydict()


def load_status(root: Path, *, write: bool = True) -> StatusSnapshot:
    """Every commit record of the store, re-reading only changed folders; compacts when `write`."""
    sroot = layout.status_root(root)
    cdir = layout.compact_dir(root, FAMILY)
    man_path = layout.compact_manifest(root, FAMILY)
    try:
        man = json.loads(man_path.read_text())
        old = _part_rows(cdir / man["part"]) if man.get("part") else {}
    except (OSError, ValueError, KeyError):
        man, old = {}, {}
    old_dirs: dict = man.get("dirs", {})
    # Rows of the compacted part, grouped by their folder.
    by_dir: dict[str, list[int]] = {}
    for i, d in enumerate(old.get("_dir", [])):
        by_dir.setdefault(d, []).append(i)
    snap = StatusSnapshot()
    cols = snap.columns
    meta_cols = {"_dir": [], "_file": [], "_size": [], "_mtime": []}
    new_dirs: dict[str, dict] = {}
    now = time.time_ns()
    changed = False
    entries = sorted(os.scandir(sroot), key=lambda e: e.name) if sroot.is_dir() else []
    for d in entries:
        if not d.is_dir() or layout.parse_status_dir(d.name) is None:
            continue
        mtime = d.stat().st_mtime_ns
        prev = old_dirs.get(d.name)
        if prev and prev.get("mtime") == mtime:
            rows = by_dir.get(d.name, [])
            if rows and rows[-1] - rows[0] + 1 == len(rows):  # the usual case: one contiguous block, sliced
                a, b = rows[0], rows[-1] + 1
                for k in STATUS_FIELDS:
                    cols[k].extend(old[k][a:b])
                for k in meta_cols:
                    meta_cols[k].extend(old[k][a:b])
            else:
                for i in rows:
                    for k in STATUS_FIELDS:
                        cols[k].append(old[k][i])
                    for k in meta_cols:
                        meta_cols[k].append(old[k][i])
            snap.rows_kept += len(by_dir.get(d.name, []))
            snap.malformed += prev.get("malformed", [])
            snap.locks += [f"{d.name}/{n}" for n in prev.get("locks", [])]
            new_dirs[d.name] = prev
            continue
        changed = True
        known = {old["_file"][i]: i for i in by_dir.get(d.name, [])}
        locks, bad = [], []
        for e in os.scandir(d.path):
            if e.name.endswith(layout.LOCK_SUFFIX):
                locks.append(e.name)
                continue
            if not e.name.endswith(layout.STATUS_SUFFIX) or e.name.startswith("."):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            i = known.get(e.name)
            if i is not None and old["_size"][i] == st.st_size and old["_mtime"][i] == st.st_mtime_ns:
                row = {k: old[k][i] for k in STATUS_FIELDS}
            else:
                snap.reread += 1
                try:
                    with open(e.path, "rb") as f:
                        row = parse_record(f.read())
                except FileNotFoundError:
                    continue
                except (MalformedRecord, OSError) as err:
                    bad.append({"file": f"{layout.STATUS}/{d.name}/{e.name}", "error": str(err)})
                    continue
            for k in STATUS_FIELDS:
                cols[k].append(row[k])
            meta_cols["_dir"].append(d.name)
            meta_cols["_file"].append(e.name)
            meta_cols["_size"].append(st.st_size)
            meta_cols["_mtime"].append(st.st_mtime_ns)
        settled = now - mtime > SETTLE_NS
        new_dirs[d.name] = {"mtime": mtime if settled else None, "malformed": bad, "locks": sorted(locks)}
        snap.malformed += bad
        snap.locks += [f"{d.name}/{n}" for n in sorted(locks)]
    if set(old_dirs) - set(new_dirs):
        changed = True
    if changed and write:
        with contextlib.suppress(OSError):
            _write_part(root, cols, meta_cols, new_dirs, man.get("part"))
    return snap


def compact_settled(root: Path, *, min_rows: int = SETTLE_MIN_ROWS) -> StatusSnapshot:
    """Compact the records as a writer that just finished does, so that readers can trust folder mtimes.

    A folder written to within SETTLE_NS is compacted without its mtime (a file added in the same clock
    tick would not change it), and every reader then stats each of its files. For folders of at least
    `min_rows` records (where those stats cost readers tenths of a second) the writer waits until the
    folder has settled and compacts again, once.
    """
    snap = load_status(root, write=True)
    try:
        man = json.loads(layout.compact_manifest(root, FAMILY).read_text())
    except (OSError, ValueError):
        return snap
    counts: dict[str, int] = {}
    for stage, key in zip(snap.columns["stage"], snap.columns["id"], strict=True):
        d = layout.status_dir(root, stage, key).name
        counts[d] = counts.get(d, 0) + 1
    fresh = [d for d, v in man.get("dirs", {}).items() if v.get("mtime") is None and counts.get(d, 0) >= min_rows]
    if not fresh:
        return snap
    newest = max((layout.status_root(root) / d).stat().st_mtime_ns for d in fresh)
    time.sleep(max(0.0, (newest + SETTLE_NS - time.time_ns()) / 1e9) + 0.05)
    return load_status(root, write=True)


def _write_part(root: Path, cols: dict, meta_cols: dict, dirs: dict, previous: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cdir = layout.compact_dir(root, FAMILY)
    cdir.mkdir(parents=True, exist_ok=True)
    tbl = StatusSnapshot(columns=cols).to_arrow()
    for k in ("_dir", "_file"):
        tbl = tbl.append_column(k, pa.array(meta_cols[k], pa.string()))
    for k in ("_size", "_mtime"):
        tbl = tbl.append_column(k, pa.array(meta_cols[k], pa.int64()))
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    with atomic_path(cdir / name, kind="compact") as tmp:
        pq.write_table(tbl, tmp, compression="zstd")
    write_json(layout.compact_manifest(root, FAMILY), {"part": name, "dirs": dirs}, kind="compact")
    fsync_dir(cdir)
    gc_parts(cdir, keep={name})


def gc_parts(cdir: Path, keep: set[str], *, older_than_s: float = 600.0) -> None:
    """Delete compacted parts no manifest names any more, once no reader can still be using them."""
    cutoff = time.time() - older_than_s
    for p in cdir.glob("part-*.parquet"):
        if p.name not in keep:
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
