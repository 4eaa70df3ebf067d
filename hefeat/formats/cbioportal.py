"""cBioPortal study files: clinical patient / sample files and the RSEM mRNA matrix.

Formats as cBioPortal's "File Formats" documentation gives them (docs.cbioportal.org, file-formats,
as of cBioPortal 5/6):

- ``data_clinical_patient.txt`` / ``data_clinical_sample.txt``: tab-separated; four header rows
  starting with ``#`` (display names, descriptions, datatypes, priorities), then the attribute ids
  (``PATIENT_ID``; the sample file also ``SAMPLE_ID``), then one row per patient / sample. Survival:
  ``OS_MONTHS`` with ``OS_STATUS`` ``1:DECEASED`` / ``0:LIVING``; ``DFS_*`` (``1:Recurred/Progressed``
  / ``0:DiseaseFree``) and ``PFS_*`` (``1:PROGRESSION`` / ``0:CENSORED``) likewise.
- ``data_mrna_seq_v2_rsem.txt``: ``Hugo_Symbol``, ``Entrez_Gene_Id``, then one column per sample
  (RSEM normalised counts, linear scale).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.formats.clinical import receptor_labels, status_event
from hefeat.formats.common import need_columns, read_tsv, text_head, to_float

SURVIVAL = {"OS": ("survival_months", "event"), "DFS": ("dfs_months", "dfs_event"),
            "PFS": ("pfs_months", "pfs_event"), "DSS": ("dss_months", "dss_event")}


def read_clinical_file(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """A cBioPortal clinical file as strings (the '#' header rows skipped)."""
    head = text_head(path, what)
    n_hash = 0
    for line in head.splitlines():
        if not line.startswith("#"):
            break
        n_hash += 1
    df = read_tsv(path, what, skiprows=n_hash)
    if df.empty:
        raise HefeatError(f"{what} {Path(path).name} has a header but no rows (truncated?)")
    return df


def clinical_table(patient_path: str | os.PathLike, sample_path: str | os.PathLike | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """(patients, samples or None, notes): patient_id + survival_months/event (OS), dfs_/pfs_/dss_ pairs,
    er_status/pr_status/her2_status labels, every other attribute lower-cased."""
    notes: list[str] = []
    pat = read_clinical_file(patient_path, "cBioPortal patient file")
    need_columns(pat, ["PATIENT_ID"], patient_path, "cBioPortal patient file")
    if pat["PATIENT_ID"].duplicated().any():
        raise HefeatError(f"cBioPortal patient file {Path(patient_path).name}: field 'PATIENT_ID' repeats "
                          f"{pat.loc[pat['PATIENT_ID'].duplicated(), 'PATIENT_ID'].iloc[0]}")
    out = pd.DataFrame({"patient_id": pat["PATIENT_ID"].str.strip()})
    for pre, (tcol, ecol) in SURVIVAL.items():
        if f"{pre}_MONTHS" in pat.columns and f"{pre}_STATUS" in pat.columns:
            out[tcol] = to_float(pat[f"{pre}_MONTHS"], patient_path, f"{pre}_MONTHS", "cBioPortal patient file")
            out[ecol] = status_event(pat[f"{pre}_STATUS"], f"{pre}_STATUS", notes)
        elif f"{pre}_MONTHS" in pat.columns or f"{pre}_STATUS" in pat.columns:
            have = f"{pre}_MONTHS" if f"{pre}_MONTHS" in pat.columns else f"{pre}_STATUS"
            other = f"{pre}_STATUS" if have.endswith("MONTHS") else f"{pre}_MONTHS"
            raise HefeatError(f"cBioPortal patient file {Path(patient_path).name}: has {have} but misses field {other!r}")
    for c in pat.columns:
        lc = c.lower()
        if c != "PATIENT_ID" and not any(c.startswith(p + "_") and c.split("_", 1)[1] in ("MONTHS", "STATUS")
                                         for p in SURVIVAL) and lc not in out.columns:
            out[lc] = pat[c].where(~(pat[c].isin(["NA", ""]) | pat[c].str.startswith("[")), np.nan)
    raw_receptors = pat.rename(columns=str.lower)
    out = receptor_labels(out.assign(**{k: raw_receptors[k] for k in raw_receptors.columns
                                        if k in ("er_status_by_ihc", "pr_status_by_ihc", "her2_status_by_ihc", "ihc_her2")}),
                          notes)
    samples = None
    if sample_path is not None:
        s = read_clinical_file(sample_path, "cBioPortal sample file")
        need_columns(s, ["SAMPLE_ID", "PATIENT_ID"], sample_path, "cBioPortal sample file")
        samples = s.rename(columns=lambda c: c.lower()).rename(columns={"sample_id": "sample_id", "patient_id": "patient_id"})
        samples = samples.apply(lambda col: col.where(~(col.isin(["NA", ""]) | col.str.startswith("[")), np.nan))
        unknown = sorted(set(samples["patient_id"]) - set(out["patient_id"]))
        if unknown:
            raise HefeatError(f"cBioPortal sample file {Path(sample_path).name}: field 'PATIENT_ID' names patients "
                              f"absent from {Path(patient_path).name}: {', '.join(unknown[:5])}")
    return out, samples, notes


def rsem_matrix(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """data_mrna_seq_v2_rsem.txt -> (samples x genes DataFrame by Hugo symbol, notes)."""
    df = read_tsv(path, "cBioPortal mRNA file")
    need_columns(df, ["Hugo_Symbol", "Entrez_Gene_Id"], path, "cBioPortal mRNA file")
    samples = [c for c in df.columns if c not in ("Hugo_Symbol", "Entrez_Gene_Id")]
    if not samples:
        raise HefeatError(f"cBioPortal mRNA file {Path(path).name} has no sample columns")
    sym = df["Hugo_Symbol"].str.strip()
    names = sym.where(~sym.isin(["", "NA"]), "ENTREZ:" + df["Entrez_Gene_Id"].str.strip())
    V = np.stack([to_float(df[s], path, s, "cBioPortal mRNA file").to_numpy() for s in samples])
    wide = pd.DataFrame(V, index=pd.Index(samples, name="sample_id"), columns=names.to_numpy())
    notes = ["cBioPortal RSEM (linear scale)"]
    return dedupe_genes(wide, notes), notes


def dedupe_genes(wide: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Keep, for each gene name on several rows, the one with the highest mean (reported in notes)."""
    if not wide.columns.duplicated().any():
        return wide
    mean = np.nan_to_num(wide.mean(0).to_numpy(), nan=-np.inf)
    order = np.lexsort((np.arange(len(mean)), -mean))
    first = ~pd.Index(wide.columns[order]).duplicated()
    keep = np.zeros(len(mean), bool)
    keep[order[first]] = True
    dup = sorted(set(wide.columns[~keep]))
    notes.append(f"{len(dup)} gene names on several rows: kept the row with the highest mean "
                 f"({', '.join(dup[:5])}{' …' if len(dup) > 5 else ''})")
    return wide.loc[:, keep]
