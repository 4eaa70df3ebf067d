"""Bring slides, expression, clinical tables and spots into a store's catalog."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store
from hefeat.store.ids import check_id, file_fingerprint, sanitize_id


@dataclass
class IngestReport:
    """What an ingest did: rows added, rows already there, ids that matched nothing."""

    kind: str
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0

    def to_dict(self) -> dict:
        """Summary for --json."""
        return {"kind": self.kind, "added": len(self.added), "unchanged": len(self.unchanged),
                "unmatched": self.unmatched, "failed": self.failed, "rows": self.rows, "ids": self.added}


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet table (by extension)."""
    p = Path(path)
    if not p.exists():
        raise HefeatError(f"File not found: {p}")
    suf = "".join(p.suffixes[-2:]).lower()
    try:
        if suf.endswith(".parquet") or suf.endswith(".pq"):
            return pd.read_parquet(p)
        for ext, sep in ((".tsv", "\t"), (".txt", "\t"), (".csv", ",")):
            if suf.endswith(ext) or suf.endswith(ext + ".gz"):
                df = pd.read_csv(p, sep=sep, header=None, nrows=1)
                names = [str(v) for v in df.iloc[0].tolist()]
                dups = sorted({n for n in names if names.count(n) > 1})
                if dups:
                    raise HefeatError(f"{p.name} has duplicate columns: {dups[:5]}; each column name must appear once")
                return pd.read_csv(p, sep=sep)
    except HefeatError:
        raise
    except Exception as e:
        raise HefeatError(f"Cannot read {p.name}: {type(e).__name__}: {e}") from None
    raise HefeatError(f"Unsupported table format {p.name}: expected .csv, .tsv or .parquet")


# ----------------------------------------------------------------------------------------------
# Slides
# ----------------------------------------------------------------------------------------------
def _read_manifest(manifest: str | os.PathLike | None) -> pd.DataFrame | None:
    if manifest is None:
        return None
    m = read_table(manifest)
    if "path" not in m.columns and "slide_id" not in m.columns:
        raise HefeatError(f"Manifest {manifest} needs a 'path' or 'slide_id' column (and may carry patient_id, site, mpp)")
    return m


def _manifest_row(m: pd.DataFrame | None, path: Path) -> dict:
    if m is None:
        return {}
    hit = pd.DataFrame()
    if "path" in m.columns:
        hit = m[m["path"].astype(str).map(lambda s: Path(s).name) == path.name]
    if hit.empty and "slide_id" in m.columns:
        hit = m[m["slide_id"].astype(str) == path.stem]
    if hit.empty:
        return {}
    row = hit.iloc[0].to_dict()
    return {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}


def ingest_slides(
    store: Store,
    paths: list[str | os.PathLike],
    *,
    mpp: float | None = None,
    manifest: str | os.PathLike | None = None,
    fail_fast: bool = False,
    progress: bool = False,
) -> IngestReport:
    """Register slide files: properties, MPP (and where it came from), fingerprint.

    Re-ingesting an unchanged slide does nothing; a slide id that already points at different
    content is an error (never a silent overwrite).
    """
    from tqdm import tqdm

    from hefeat.slides.reader import Slide

    store.require()
    if not paths:
        raise HefeatError("No slide files given. Example: hefeat ingest slides data/demo/slides/*.tiff")
    m = _read_manifest(manifest)
    rep = IngestReport("slides")
    existing = store.sql("SELECT slide_id, fingerprint, path FROM slides").set_index("slide_id")
    rows = []
    for p in tqdm([Path(x) for x in paths], disable=not progress, desc="slides"):
        meta = _manifest_row(m, p)
        sid = str(meta.get("slide_id") or sanitize_id(p.stem))
        try:
            check_id(sid)
            slide_mpp = meta.get("mpp", mpp)
            with Slide(p, mpp=float(slide_mpp) if slide_mpp is not None else None) as s:
                fp = file_fingerprint(p)
                if sid in existing.index:
                    if existing.loc[sid, "fingerprint"] == fp:
                        rep.unchanged.append(sid)
                        continue
                    raise HefeatError(
                        f"slide id {sid} is already in the store with different content "
                        f"({existing.loc[sid, 'path']}); give this file another slide_id in a manifest"
                    )
                rows.append({
                    "slide_id": sid, "patient_id": str(meta.get("patient_id", sid)),
                    "site": str(meta["site"]) if "site" in meta else None, "path": str(p.absolute()),
                    "fingerprint": fp, "vendor": s.vendor, "width": s.dimensions[0], "height": s.dimensions[1],
                    "level_count": s.level_count, "level_dimensions": json.dumps([list(d) for d in s.level_dimensions]),
                    "mpp_x": s.mpp.x, "mpp_y": s.mpp.y, "mpp_source": s.mpp.source,
                    "objective_power": s.objective_power, "ingested_at": pd.Timestamp.now(),
                })
                rep.added.append(sid)
        except HefeatError as e:
            if fail_fast or len(paths) == 1:
                raise
            rep.failed[str(p)] = str(e)
    if rows:
        df = pd.DataFrame(rows)
        if df["slide_id"].duplicated().any():
            dup = df.loc[df["slide_id"].duplicated(), "slide_id"].tolist()
            raise HefeatError(f"Two files map to the same slide id: {dup}. Give them distinct slide_id in a manifest.")
        with store.connect(write=True, views=False) as con:
            con.register("new_slides", df)
            con.execute("INSERT INTO slides SELECT * FROM new_slides")
    rep.rows = len(rows)
    return rep


# ----------------------------------------------------------------------------------------------
# Expression
# ----------------------------------------------------------------------------------------------
def _to_long(df: pd.DataFrame, sample_col: str | None) -> pd.DataFrame:
    cols = {c.lower(): c for c in df.columns}
    if {"sample_id", "gene", "value"} <= set(cols):
        long = df.rename(columns={cols["sample_id"]: "sample_id", cols["gene"]: "gene", cols["value"]: "value"})
        long = long[["sample_id", "gene", "value"]].copy()
        dup = long.duplicated(["sample_id", "gene"])
        if dup.any():
            ex = long.loc[dup, ["sample_id", "gene"]].head(3).values.tolist()
            raise HefeatError(f"Expression table repeats (sample, gene) pairs, e.g. {ex}; each pair must appear once")
        return long
    sc = sample_col or next((cols[c] for c in ("sample_id", "sample", "slide_id", "patient_id") if c in cols), df.columns[0])
    if df[sc].duplicated().any():
        dup = df.loc[df[sc].duplicated(), sc].astype(str).tolist()[:5]
        raise HefeatError(f"Expression table has duplicate samples: {dup}; one row per sample expected")
    genes = [c for c in df.columns if c != sc]
    dup_genes = pd.Index(map(str, genes))[pd.Index(map(str, genes)).duplicated()]
    if len(dup_genes):
        raise HefeatError(f"Expression table has duplicate gene columns: {sorted(set(dup_genes))[:5]}")
    if not genes:
        raise HefeatError("Expression table has a sample column but no gene columns")
    long = df.melt(id_vars=[sc], value_vars=genes, var_name="gene", value_name="value")
    return long.rename(columns={sc: "sample_id"})


def ingest_expression(
    store: Store,
    path: str | os.PathLike,
    *,
    dataset: str = "expression",
    sample_col: str | None = None,
    allow_unmatched: bool = False,
) -> IngestReport:
    """Ingest bulk expression (wide samples × genes, or long sample/gene/value) as dataset `dataset`.

    Samples are matched to slides by slide_id, then by patient_id. Unmatched samples are an error
    (listing them) unless allow_unmatched, in which case they are kept and reported.
    """
    store.require()
    check_id(dataset, "dataset")
    raw = read_table(path)
    long = _to_long(raw, sample_col)
    long["sample_id"] = long["sample_id"].astype(str)
    long["gene"] = long["gene"].astype(str)
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    slides = store.sql("SELECT slide_id, patient_id FROM slides")
    samples = pd.DataFrame({"sample_id": long["sample_id"].unique()})
    by_slide = samples.merge(slides, left_on="sample_id", right_on="slide_id", how="inner")
    rest = samples[~samples["sample_id"].isin(by_slide["sample_id"])]
    by_patient = rest.merge(slides, left_on="sample_id", right_on="patient_id", how="inner")
    mapping = pd.concat([by_slide, by_patient], ignore_index=True)[["sample_id", "slide_id", "patient_id"]]
    unmatched = sorted(set(samples["sample_id"]) - set(mapping["sample_id"]))
    if unmatched and not allow_unmatched:
        raise HefeatError(
            f"{len(unmatched)} of {len(samples)} samples match no slide or patient in the store: "
            f"{', '.join(unmatched[:8])}{' …' if len(unmatched) > 8 else ''}. Ingest those slides first, "
            "fix the ids, or pass --allow-unmatched to keep them anyway."
        )
    if mapping.empty:
        raise HefeatError("No sample of the expression table matches a slide or patient in the store")
    mapping.insert(0, "dataset", dataset)
    long.insert(0, "dataset", dataset)
    rep = IngestReport("expression", unmatched=unmatched, rows=len(long))
    fp = file_fingerprint(path)
    with store.connect(write=True, views=False) as con:
        done = con.execute("SELECT count(*) FROM ingests WHERE kind = ? AND fingerprint = ?", [f"expression:{dataset}", fp]).fetchone()[0]
        if done:
            rep.unchanged = [dataset]
            return rep
        con.execute("BEGIN")
        con.execute("DELETE FROM expression WHERE dataset = ?", [dataset])
        con.execute("DELETE FROM samples WHERE dataset = ?", [dataset])
        con.register("new_long", long)
        con.register("new_map", mapping)
        con.execute("INSERT INTO expression SELECT dataset, sample_id, gene, value FROM new_long")
        con.execute("INSERT INTO samples SELECT dataset, sample_id, slide_id, patient_id FROM new_map")
        con.execute("INSERT INTO ingests VALUES (?, ?, ?, ?, now())", [f"expression:{dataset}", str(path), fp, len(long)])
        con.execute("COMMIT")
    rep.added = [dataset]
    return rep


# ----------------------------------------------------------------------------------------------
# Clinical
# ----------------------------------------------------------------------------------------------
def ingest_clinical(store: Store, path: str | os.PathLike, *, allow_unmatched: bool = False) -> IngestReport:
    """Ingest a clinical table (any columns) keyed by slide_id or patient_id; replaces the previous one.

    A slide-keyed table that also has patient_id / site fills those in on the slides.
    """
    store.require()
    df = read_table(path)
    key = "slide_id" if "slide_id" in df.columns else "patient_id" if "patient_id" in df.columns else None
    if key is None:
        raise HefeatError(f"Clinical table {Path(path).name} needs a slide_id or patient_id column; it has {list(df.columns)[:8]}")
    df[key] = df[key].astype(str)
    if df[key].duplicated().any():
        raise HefeatError(f"Clinical table has duplicate {key}: {df.loc[df[key].duplicated(), key].tolist()[:5]}")
    slides = store.sql("SELECT slide_id, patient_id FROM slides")
    unmatched = sorted(set(df[key]) - set(slides[key]))
    if unmatched and not allow_unmatched:
        raise HefeatError(
            f"{len(unmatched)} rows of the clinical table match no {key} in the store: {', '.join(unmatched[:8])}. "
            "Ingest those slides first or pass --allow-unmatched."
        )
    rep = IngestReport("clinical", unmatched=unmatched, rows=len(df), added=[key])
    with store.connect(write=True, views=False) as con:
        con.execute("BEGIN")
        con.register("new_clinical", df)
        con.execute("CREATE OR REPLACE TABLE clinical AS SELECT * FROM new_clinical")
        if key == "slide_id":
            for col in ("patient_id", "site"):
                if col in df.columns:
                    con.execute(f"UPDATE slides SET {col} = CAST(c.{col} AS VARCHAR) FROM new_clinical c WHERE slides.slide_id = c.slide_id")
        con.execute("INSERT INTO ingests VALUES ('clinical', ?, ?, ?, now())", [str(path), file_fingerprint(path), len(df)])
        con.execute("COMMIT")
    return rep


# ----------------------------------------------------------------------------------------------
# Spots
# ----------------------------------------------------------------------------------------------
def ingest_spots(store: Store, path: str | os.PathLike, *, allow_unmatched: bool = False) -> IngestReport:
    """Ingest spatial spots: slide_id, spot_id, x, y (level-0 px of the centre), then one count column per gene."""
    store.require()
    df = read_table(path)
    need = {"slide_id", "spot_id", "x", "y"}
    if not need <= set(df.columns):
        raise HefeatError(f"Spots table needs columns {sorted(need)}; missing {sorted(need - set(df.columns))}")
    df["slide_id"] = df["slide_id"].astype(str)
    df["spot_id"] = df["spot_id"].astype(str)
    if df.duplicated(["slide_id", "spot_id"]).any():
        raise HefeatError("Spots table repeats (slide_id, spot_id) pairs")
    known = set(store.sql("SELECT slide_id FROM slides")["slide_id"])
    unmatched = sorted(set(df["slide_id"]) - known)
    if unmatched and not allow_unmatched:
        raise HefeatError(f"Spots on slides not in the store: {', '.join(unmatched[:8])}. Ingest those slides first.")
    df = df[df["slide_id"].isin(known)]
    genes = [c for c in df.columns if c not in need]
    long = df.melt(id_vars=["slide_id", "spot_id"], value_vars=genes, var_name="gene", value_name="count")
    rep = IngestReport("spots", unmatched=unmatched, rows=len(df), added=sorted(df["slide_id"].unique()))
    with store.connect(write=True, views=False) as con:
        con.execute("BEGIN")
        con.register("new_spots", df[["slide_id", "spot_id", "x", "y"]])
        con.register("new_counts", long)
        con.execute("DELETE FROM spots WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("DELETE FROM spot_counts WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("INSERT INTO spots SELECT slide_id, spot_id, x, y FROM new_spots")
        con.execute("INSERT INTO spot_counts SELECT slide_id, spot_id, gene, count FROM new_counts")
        con.execute("INSERT INTO ingests VALUES ('spots', ?, ?, ?, now())", [str(path), file_fingerprint(path), len(df)])
        con.execute("COMMIT")
    return rep
