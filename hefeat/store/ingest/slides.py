"""Slides into the catalog: manifests, one row per slide, replacing a slide only when asked."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.ids import check_id, file_fingerprint, sanitize_id
from hefeat.store.ingest.common import IngestReport, check_mpp, read_table


class SlideManifest:
    """A slide manifest indexed once by file name and by slide_id (lookups are O(1))."""

    def __init__(self, path: str | os.PathLike):
        m = read_table(path)
        if "path" not in m.columns and "slide_id" not in m.columns:
            raise HefeatError(f"Manifest {path} needs a 'path' or 'slide_id' column (and may carry patient_id, site, mpp)")
        self.by_name: dict[str, dict] = {}
        self.by_id: dict[str, dict] = {}
        for i, row in enumerate(m.to_dict("records")):
            row = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
            if "mpp" in row:
                row["mpp"] = check_mpp(row["mpp"], f"Manifest {Path(path).name} row {i + 2}")
            if "path" in row:
                self.by_name.setdefault(Path(str(row["path"])).name, row)
            if "slide_id" in row:
                self.by_id.setdefault(str(row["slide_id"]), row)

    def row(self, path: Path) -> dict:
        """The manifest row of a slide file (by file name, then by stem as slide_id); {} if none."""
        return self.by_name.get(path.name) or self.by_id.get(path.stem) or {}


def slide_row(slide, path: Path, meta: dict, mpp_asked: bool) -> dict:
    """The catalog row of an opened slide (`slide`: a hefeat.slides.reader.Slide) with its manifest metadata."""
    sid = check_id(str(meta.get("slide_id") or sanitize_id(path.stem)))
    return {
        "slide_id": sid, "patient_id": str(meta.get("patient_id", sid)),
        "site": str(meta["site"]) if "site" in meta else None, "path": str(path.absolute()),
        "fingerprint": file_fingerprint(path), "vendor": slide.vendor, "width": slide.dimensions[0],
        "height": slide.dimensions[1], "level_count": slide.level_count,
        "level_dimensions": json.dumps([list(d) for d in slide.level_dimensions]),
        "mpp_x": slide.mpp.x, "mpp_y": slide.mpp.y, "mpp_source": slide.mpp.source,
        "objective_power": slide.objective_power, "ingested_at": pd.Timestamp.now(),
        "_mpp_asked": mpp_asked, "_meta": meta,
    }


def _records_of(store: Store, slide_id: str) -> list[Path]:
    """Commit records of one slide in every stage."""
    out = []
    sroot = layout.status_root(store.root)
    if sroot.is_dir():
        for d in sroot.iterdir():
            p = d / f"{slide_id}{layout.STATUS_SUFFIX}"
            if p.exists():
                out.append(p)
    return out


def register_slides(store: Store, probed: Iterable[tuple[Path, dict | None, str | None]], *, n_files: int,
                    fail_fast: bool = False, replace: bool = False) -> IngestReport:
    """Add or update the catalog rows of probed slide files ((path, row, error) from `slide_row`).

    Re-ingesting an unchanged slide does nothing. A slide id that already points at different
    content is an error (never a silent overwrite). A new MPP (or manifest patient/site) for a
    known slide is applied; if the slide already has tiles, that needs replace=True, which also
    withdraws its tiles and features so the next `hefeat tile`/`extract` redoes them.
    """
    rep = IngestReport("slides")
    existing = store.sql("SELECT * FROM slides").set_index("slide_id")
    new_rows, updates, withdraw = [], [], []
    seen: dict[str, Path] = {}
    for p, row, err in probed:
        if err is None and row["slide_id"] in seen:
            err = f"slide id {row['slide_id']} is also given by {seen[row['slide_id']]}; give one of them another slide_id in a manifest"
        if err is None and row["slide_id"] in existing.index:
            err = _against_existing(store, existing.loc[row["slide_id"]], row, replace, rep, updates, withdraw)
        elif err is None:
            new_rows.append(row)
            rep.added.append(row["slide_id"])
        if err is not None:
            if fail_fast or n_files == 1:
                raise HefeatError(err)
            rep.failed[str(p)] = err
            continue
        seen[row["slide_id"]] = p
    cols = list(existing.reset_index().columns)
    if new_rows or updates:
        with store.connect(write=True) as con:
            if new_rows:
                con.register("new_slides", pd.DataFrame(new_rows)[cols])
                con.execute("INSERT INTO slides SELECT * FROM new_slides")
            if updates:
                con.register("upd_slides", pd.DataFrame(updates))
                con.execute("UPDATE slides SET patient_id = u.patient_id, site = u.site, mpp_x = u.mpp_x, "
                            "mpp_y = u.mpp_y, mpp_source = u.mpp_source, ingested_at = u.ingested_at "
                            "FROM upd_slides u WHERE slides.slide_id = u.slide_id")
        for p in withdraw:  # after the catalog commit: the slide's old tiles/features stop being visible
            p.unlink(missing_ok=True)
    rep.rows = len(new_rows) + len(updates)
    return rep


def _against_existing(store: Store, old: pd.Series, row: dict, replace: bool, rep: IngestReport,
                      updates: list, withdraw: list) -> str | None:
    """Compare a probed slide with its catalog row; queue an update or return an error message."""
    sid = row["slide_id"]
    if old["fingerprint"] != row["fingerprint"]:
        return (f"slide id {sid} is already in the store with different content ({old['path']}); "
                "give this file another slide_id in a manifest")
    meta = row["_meta"]
    change = {}
    if row["_mpp_asked"] and (not math.isclose(old["mpp_x"], row["mpp_x"]) or not math.isclose(old["mpp_y"], row["mpp_y"])):
        change["mpp"] = f"{old['mpp_x']:g} -> {row['mpp_x']:g} µm/px"
    for k in ("patient_id", "site"):
        if k in meta and str(meta[k]) != str(old[k]):
            change[k] = f"{old[k]} -> {meta[k]}"
    if not change:
        rep.unchanged.append(sid)
        return None
    if "mpp" in change:
        derived = _records_of(store, sid)
        if derived and not replace:
            stages = sorted({p.parent.name for p in derived})
            return (f"slide {sid} already has results computed at {old['mpp_x']:g} µm/px ({', '.join(stages[:4])}); "
                    f"re-ingest with --replace to apply MPP {row['mpp_x']:g} and redo its tiles and features")
        withdraw.extend(derived)
    keep = {k: (row[k] if k in ("mpp_x", "mpp_y", "mpp_source") and "mpp" in change else
                (str(meta[k]) if k in ("patient_id", "site") and k in change else old[k]))
            for k in ("patient_id", "site", "mpp_x", "mpp_y", "mpp_source")}
    updates.append({"slide_id": sid, "ingested_at": row["ingested_at"], **keep})
    rep.updated.append(f"{sid}: " + ", ".join(f"{k} {v}" for k, v in change.items()))
    return None
