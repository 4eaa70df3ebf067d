"""Clinical tables (patients, samples; cBioPortal, GDC) into the catalog, one row per slide."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store
from hefeat.store.ids import file_fingerprint
from hefeat.store.ingest.common import IngestReport, first_line, read_table


def ingest_clinical(store: Store, path: str | os.PathLike, *, allow_unmatched: bool = False) -> IngestReport:
    """Ingest a clinical table (any columns) keyed by slide_id or patient_id; replaces the previous one.

    A slide-keyed table that also has patient_id / site fills those in on the slides.
    """
    store.require()
    return write_clinical(store, read_table(path), path, allow_unmatched=allow_unmatched)


def write_clinical(store: Store, df: pd.DataFrame, path: str | os.PathLike, *, allow_unmatched: bool = False,
                   notes: list[str] | None = None) -> IngestReport:
    """Validate a clinical table keyed by slide_id or patient_id and make it the store's clinical table."""
    key = "slide_id" if "slide_id" in df.columns else "patient_id" if "patient_id" in df.columns else None
    if key is None:
        raise HefeatError(f"Clinical table {Path(path).name} needs a slide_id or patient_id column; it has {list(df.columns)[:8]}")
    if df[key].isna().any():
        rows = (np.nonzero(df[key].isna().to_numpy())[0][:5] + 2).tolist()
        raise HefeatError(f"Clinical table has empty {key} on rows {rows} (line numbers); every row needs one")
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
    rep = IngestReport("clinical", unmatched=unmatched, rows=len(df), added=[key], notes=list(notes or []))
    src = Path(path)
    with store.connect(write=True) as con:
        con.register("new_clinical", df)
        con.execute("CREATE OR REPLACE TABLE clinical AS SELECT * FROM new_clinical")
        if key == "slide_id":
            for col in ("patient_id", "site"):
                if col in df.columns:
                    con.execute(f"UPDATE slides SET {col} = CAST(c.{col} AS VARCHAR) FROM new_clinical c "
                                f"WHERE slides.slide_id = c.slide_id AND c.{col} IS NOT NULL")
        con.execute("INSERT INTO ingests VALUES ('clinical', ?, ?, ?, now())",
                    [str(path), file_fingerprint(src) if src.is_file() else None, len(df)])
    return rep


CLINICAL_FORMATS = ("auto", "table", "cbioportal", "gdc")


def clinical_format(path: str | os.PathLike) -> str:
    """cbioportal (a '#' header or PATIENT_ID), gdc (case_submitter_id / cases.submitter_id) or table."""
    head = first_line(Path(path))
    if head.startswith("#") or "PATIENT_ID" in [c.strip() for c in head.split("\t")]:
        return "cbioportal"
    if "case_submitter_id" in head or "cases.submitter_id" in head:
        return "gdc"
    return "table"


def clinical_by_slide(store: Store, patients: pd.DataFrame, samples: pd.DataFrame | None, *,
                      sample_types: Iterable[str] | None = None, slide_types: Iterable[str] | None = None
                      ) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Patient (and sample) rows of a TCGA cohort -> one row per eligible slide; (table, unmatched patients, notes).

    Eligible slides are those expression matching uses (primary tumour 01, diagnostic DX by default),
    so a normal or frozen slide never inherits its patient's tumour label.
    """
    from hefeat.formats import tcga

    sample_types = {str(t).zfill(2) for t in (sample_types or tcga.DEFAULT_SAMPLE_TYPES)}
    slide_types = {t.upper() for t in (slide_types or tcga.DEFAULT_SLIDE_TYPES)}
    tab = tcga.slide_table(store.sql("SELECT slide_id, patient_id, path FROM slides"))
    ok = tab["sample_type"].isin(sample_types) & tab["slide_type"].isin(slide_types)
    elig = tab[ok][["slide_id", "patient", "sample"]].rename(columns={"patient": "patient_id", "sample": "_sample"})
    out = elig.merge(patients, on="patient_id", how="inner")
    if samples is not None and "sample_id" in samples.columns:
        sm = samples.drop(columns=["patient_id"], errors="ignore").copy()
        sm["_sample"] = sm["sample_id"].astype(str).str[:15]
        out = out.merge(sm.drop_duplicates("_sample"), on="_sample", how="left", suffixes=("", "_sample"))
    out = out.drop(columns="_sample")
    unmatched = sorted(set(patients["patient_id"]) - set(tab["patient"]))
    notes = []
    no_elig = sorted(set(patients["patient_id"]) & set(tab["patient"]) - set(elig["patient_id"]))
    if no_elig:
        notes.append(f"{len(no_elig)} patients have no {'/'.join(sorted(slide_types))} slide of sample type "
                     f"{'/'.join(sorted(sample_types))}: {', '.join(no_elig[:5])}")
    n_left = int((~ok).sum())
    if n_left:
        notes.append(f"{n_left} slides (frozen, normal or other sample types) get no clinical row: "
                     f"{', '.join(tab[~ok]['slide_id'].tolist()[:5])}{' …' if n_left > 5 else ''}")
    return out.reset_index(drop=True), unmatched, notes


def ingest_clinical_source(
    store: Store,
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    samples: str | os.PathLike | None = None,
    allow_unmatched: bool = False,
    sample_types: Iterable[str] | None = None,
    slide_types: Iterable[str] | None = None,
) -> IngestReport:
    """Ingest clinical data as published: cBioPortal patient (+ sample) files, the GDC clinical TSV, or a table.

    Survival becomes survival_months + event (OS; DFS/PFS as dfs_/pfs_ pairs); TCGA receptor columns
    become er_status / pr_status / her2_status (1/0, unknowns missing and counted). In a store of
    TCGA slides the table is written per eligible slide (see `clinical_by_slide`).
    """
    from hefeat.formats import cbioportal, gdc, tcga

    store.require()
    if fmt not in CLINICAL_FORMATS:
        raise HefeatError(f"Unknown clinical format {fmt!r}; use one of {', '.join(CLINICAL_FORMATS)}")
    p = Path(path)
    if not p.is_file():
        raise HefeatError(f"File not found: {p}")
    fmt = clinical_format(p) if fmt == "auto" else fmt
    if fmt == "table":
        if samples:
            raise HefeatError("--samples goes with cBioPortal files (data_clinical_sample.txt)")
        table = read_table(p)
        if "slide_id" in table.columns or "patient_id" not in table.columns or table["patient_id"].isna().any() or \
                table["patient_id"].duplicated().any() or not tcga.looks_like_barcodes(table["patient_id"].astype(str)):
            return write_clinical(store, table, p, allow_unmatched=allow_unmatched)
        # a patient-keyed table of TCGA patients: rows go to the eligible slides, as for cBioPortal/GDC files
        pat, smp, notes = table.assign(patient_id=table["patient_id"].astype(str)), None, []
    elif fmt == "cbioportal":
        pat, smp, notes = cbioportal.clinical_table(p, samples)
    else:
        if samples:
            raise HefeatError("--samples goes with cBioPortal files (data_clinical_sample.txt)")
        pat, notes = gdc.clinical_table(p)
        smp = None
    slides = store.sql("SELECT slide_id, patient_id, path FROM slides")
    if tcga.looks_like_barcodes(pat["patient_id"]) and not tcga.slide_table(slides).empty:
        table, unmatched, more = clinical_by_slide(store, pat, smp, sample_types=sample_types, slide_types=slide_types)
        if unmatched and not allow_unmatched:
            raise HefeatError(f"{len(unmatched)} patients of {p.name} have no slide in the store: "
                              f"{', '.join(unmatched[:8])}. Ingest those slides first or pass --allow-unmatched.")
        if table.empty:
            raise HefeatError(f"No patient of {p.name} has an eligible slide in the store")
        rep = write_clinical(store, table, p, allow_unmatched=True, notes=notes + more)
        rep.unmatched = unmatched
        return rep
    return write_clinical(store, pat, p, allow_unmatched=allow_unmatched, notes=notes)
