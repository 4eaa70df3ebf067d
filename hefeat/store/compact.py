"""Compaction of per-slide Parquet files (tiles of a tiling, predictions of a model).

Workers write one Parquet file per slide; a query over 10,000 of them opens 10,000 footers. A
family's finished files are therefore copied, in slide order, into a few large parts
(compact/<family>/part-*.parquet, row groups of ~64k rows so a one-slide filter reads one or two of
them), listed with the member slides and their content tokens in a manifest. A view over a family
reads the parts, minus members whose token changed, plus the member files not compacted yet, so
the answer never depends on whether compaction ran. Parts are written by DuckDB (COPY), never need
the catalog's lock, and a part no manifest names is deleted only after readers are done with it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from hefeat.store import layout
from hefeat.store.atomic import atomic_path, write_json
from hefeat.store.records import gc_parts

#: Member files read loose before a view compacts them.
LOOSE_MAX = 64
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


def _manifest(root: Path, name: str) -> dict:
    try:
        return json.loads(layout.compact_manifest(root, name).read_text())
    except (OSError, ValueError):
        return {"parts": []}


def plan(root: Path, name: str, members: dict[str, tuple]) -> Plan:
    """Plan reading family `name` whose current members are {member: (file, token[, size])}.

    A member file not compacted yet whose size is not the recorded one (truncated, appended to,
    deleted) is left out and listed in `broken`, so one damaged file cannot break every query.
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
    loose, broken = [], []
    for m in sorted(members):
        if covered.get(m) == members[m][1]:
            continue
        path, size = Path(members[m][0]), (members[m][2] if len(members[m]) > 2 else None)
        try:
            intact = size is None or path.stat().st_size == size
        except OSError:
            intact = False
        (loose.append(path) if intact else broken.append(m))
    return Plan(name, parts, exclude, loose, broken)


def compact(root: Path, name: str, members: dict[str, tuple], *, key: str = "slide_id") -> Plan:
    """Copy the family's loose member files into a new part (merging parts when there are many)."""
    import duckdb

    pl = plan(root, name, members)
    man = _manifest(root, name)
    cdir = layout.compact_dir(root, name)
    cdir.mkdir(parents=True, exist_ok=True)
    live = [p for p in man.get("parts", []) if (cdir / p["file"]).exists()]
    stale = set(pl.exclude)
    merge = len(live) + 1 > PARTS_MAX or bool(stale)
    loose_members = sorted(m for m in members if members[m][0] in set(pl.loose))
    if not loose_members and not merge:
        return pl
    con = duckdb.connect(":memory:", config={"memory_limit": "2GB", "threads": 2, "preserve_insertion_order": True})
    try:
        # Inputs are listed in member order and insertion order is kept, so each member's rows stay
        # contiguous (row-group statistics then prune a one-slide filter) without a sort.
        if merge:  # one new part with everything current
            srcs = []
            if live:
                excl = f" WHERE {key} NOT IN ({', '.join(sql_str(m) for m in sorted(stale))})" if stale else ""
                srcs.append(f"SELECT * FROM {scan([cdir / p['file'] for p in live])}{excl}")
            if pl.loose:
                srcs.append(f"SELECT * FROM {scan(pl.loose)}")
            select = " UNION ALL BY NAME ".join(srcs)
            new_members = {m: tok for p in live for m, tok in p["members"].items() if m not in stale}
            new_members.update({m: members[m][1] for m in loose_members})
            keep_parts: list[dict] = []
        else:
            select = f"SELECT * FROM {scan(pl.loose)}"
            new_members = {m: members[m][1] for m in loose_members}
            keep_parts = live
        if not new_members:
            rows = 0
            fname = None
        else:
            fname = f"part-{uuid.uuid4().hex[:12]}.parquet"
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


def maybe_compact(root: Path, name: str, members: dict[str, tuple], *, writable: bool,
                  key: str = "slide_id") -> Plan:
    """The family's read plan, compacting first when too many member files are loose."""
    pl = plan(root, name, members)
    if writable and (len(pl.loose) > LOOSE_MAX or (pl.exclude and pl.loose)):
        try:
            return compact(root, name, members, key=key)
        except Exception:  # compaction only saves time: the plan without it reads the same rows
            return pl
    return pl
