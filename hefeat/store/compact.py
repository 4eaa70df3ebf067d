"""Compaction of per-slide Parquet files (tiles of a tiling, predictions of a model).

Workers write one Parquet file per slide; a query over 10,000 of them opens 10,000 footers. A
family's finished files are therefore copied, in slide order, into a few large parts
(compact/<family>/part-*.parquet, row groups of ~64k rows so a one-slide filter reads one or two of
them), listed with the member slides and their content tokens in a manifest. A view over a family
reads the parts, minus members whose token changed, plus the member files not compacted yet, so
the answer never depends on whether compaction ran. Compaction is a writer's step (after a
tiling, an extraction, a fit or a prediction commits, and `hefeat compact`); reading plans only. Parts are written by DuckDB (COPY), never need
the catalog's lock, and a part no manifest names is deleted only after readers are done with it.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hefeat.store import layout
from hefeat.store.atomic import atomic_path, write_json
from hefeat.store.records import gc_parts

#: Parts kept before they are merged into one.
PARTS_MAX = 8
ROW_GROUP = 65536


def sql_str(s: str | Path) -> str:
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def sql_list(items) -> str:
    """A SQL list of string literals."""
    return "[" + ", ".join(sql_str(x) for x in items) + "]"


def scan(files, *, union: bool = True) -> str:
    """read_parquet over files by name (folder names like model=<id> are ids, not columns to add)."""
    return f"read_parquet({sql_list(files)}, union_by_name={str(union).lower()}, hive_partitioning=false)"


@dataclass
class Plan:
    """How to read one family now: compacted parts, members to drop from them, loose files."""

    name: str
    parts: list[Path]
    exclude: list[str]
    loose: list[Path]
    broken: list[str]
    loose_members: list[str] = field(default_factory=list)

    def sql(self, key: str = "slide_id") -> str | None:
        """A SELECT over the family (None when it has no rows)."""
        branches = []
        if self.parts:
            where = f" WHERE {key} NOT IN ({', '.join(sql_str(m) for m in self.exclude)})" if self.exclude else ""
            branches.append(f"SELECT * FROM {scan(self.parts)}{where}")
        if self.loose:
            branches.append(f"SELECT * FROM {scan(self.loose)}")
        if not branches:
            return None
        return " UNION ALL BY NAME ".join(branches)

    @property
    def compacted(self) -> bool:
        """True when every member is read from a compacted part (no loose file, nothing excluded)."""
        return not self.loose and not self.exclude


def _manifest(root: Path, name: str) -> dict:
    try:
        return json.loads(layout.compact_manifest(root, name).read_text())
    except (OSError, ValueError):
        return {"parts": []}


def plan(root: Path, name: str, members: dict[str, tuple]) -> Plan:
    """Plan reading family `name` whose current members are {member: (file, token[, size])}.

    Reading only: nothing is written. A member file not compacted yet whose size is not the recorded
    one (truncated, appended to, deleted) is left out and listed in `broken`, so one damaged file
    cannot break every query.
    """
    man = _manifest(root, name)
    cdir = layout.compact_dir(root, name)
    covered: dict[str, str] = {}
    parts = []
    for part in man.get("parts", []):
        p = cdir / part["file"]
        if not p.exists():
            continue
        parts.append(p)
        covered.update(part["members"])
    exclude = sorted(m for m, tok in covered.items() if members.get(m, (None, None))[1] != tok)
    loose, loose_members, broken = [], [], []
    for m in sorted(members):
        if covered.get(m) == members[m][1]:
            continue
        path, size = Path(members[m][0]), (members[m][2] if len(members[m]) > 2 else None)
        try:
            intact = size is None or path.stat().st_size == size
        except OSError:
            intact = False
        if intact:
            loose.append(path)
            loose_members.append(m)
        else:
            broken.append(m)
    return Plan(name, parts, exclude, loose, broken, loose_members)


@contextlib.contextmanager
def _family_lock(cdir: Path):
    """Serialise compactions of one family across processes (advisory; skipped where unsupported)."""
    cdir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        f = open(cdir / layout.COMPACT_LOCK, "a+b")  # noqa: SIM115 - held for the block
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # closing releases the lock


def _to_merge(live: list[dict], stale: set[str]) -> list[dict]:
    """The parts rewritten by this compaction: those holding stale members, then the smallest half
    of the rest when one more part would exceed PARTS_MAX (size-tiered, so a big part is rarely rewritten)."""
    merge = [p for p in live if stale & set(p["members"])]
    rest = sorted((p for p in live if p not in merge), key=lambda p: p.get("rows", 0))
    if len(rest) + 1 > PARTS_MAX:
        merge += rest[: max(2, len(rest) // 2)]
    return merge


def compact(root: Path, name: str, members: dict[str, tuple], *, key: str = "slide_id") -> Plan:
    """Copy the family's loose member files into a new part; returns the read plan afterwards.

    A writer's step (the tiling and extraction runners, model saving and prediction, `hefeat
    compact`), never a reader's. Parts that hold members whose file changed since, and the smallest
    parts when there are too many, are merged into the new part.
    """
    import duckdb

    cdir = layout.compact_dir(root, name)
    with _family_lock(cdir):
        pl = plan(root, name, members)
        man = _manifest(root, name)
        live = [p for p in man.get("parts", []) if (cdir / p["file"]).exists()]
        stale = set(pl.exclude)
        merge = _to_merge(live, stale)
        if not pl.loose_members and not merge:
            return pl
        keep_parts = [p for p in live if p not in merge]
        new_members = {m: tok for p in merge for m, tok in p["members"].items() if m not in stale}
        new_members.update({m: members[m][1] for m in pl.loose_members})
        fname, rows = None, 0
        if new_members:
            srcs = []
            if merge:
                excl = f" WHERE {key} NOT IN ({', '.join(sql_str(m) for m in sorted(stale))})" if stale else ""
                srcs.append(f"SELECT * FROM {scan([cdir / p['file'] for p in merge])}{excl}")
            if pl.loose:
                srcs.append(f"SELECT * FROM {scan(pl.loose)}")
            select = " UNION ALL BY NAME ".join(srcs)
            fname = f"part-{uuid.uuid4().hex[:12]}.parquet"
            con = duckdb.connect(":memory:", config={"memory_limit": "2GB", "threads": 2,
                                                     "preserve_insertion_order": True})
            try:
                # Inputs are listed in member order and insertion order is kept, so each member's rows stay
                # contiguous (row-group statistics then prune a one-slide filter) without a sort.
                with atomic_path(cdir / fname, kind="compact") as tmp:
                    con.execute(f"COPY ({select}) TO {sql_str(tmp)} "
                                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP})")
                    rows = con.execute(f"SELECT count(*) FROM read_parquet({sql_str(tmp)})").fetchone()[0]
            finally:
                con.close()
        parts = keep_parts + ([{"file": fname, "rows": int(rows), "members": new_members}] if fname else [])
        write_json(layout.compact_manifest(root, name), {"parts": parts}, kind="compact")
        gc_parts(cdir, keep={p["file"] for p in parts})
        return plan(root, name, members)
