"""GDC downloads: the gdc-client manifest, the sample sheet, STAR-Counts files and the clinical TSV.

Formats as the GDC Data Portal writes them (GDC Data Release 32+, GENCODE v36, "Gene Expression
Quantification" / workflow "STAR - Counts"; docs.gdc.cancer.gov, "Data Transfer Tool" and
"mRNA Analysis Pipeline"):

- manifest (gdc-client): tab-separated ``id, filename, md5, size, state``;
- sample sheet: tab-separated ``File ID, File Name, Data Category, Data Type, Project ID, Case ID,
  Sample ID, Sample Type`` (newer portals add Tissue Type, Tumor Descriptor, Specimen Type,
  Preservation Method); several samples of one file are comma-separated;
- STAR-Counts file (``<uuid>.rna_seq.augmented_star_gene_counts.tsv`` in a folder named by its file
  id): a ``# gene-model: GENCODE v36`` line, the header ``gene_id, gene_name, gene_type, unstranded,
  stranded_first, stranded_second, tpm_unstranded, fpkm_unstranded, fpkm_uq_unstranded``, four
  ``N_unmapped / N_multimapping / N_noFeature / N_ambiguous`` rows, then one row per gene;
- clinical TSV (the cart's "Clinical: TSV" ``clinical.tsv``): one row per case (and diagnosis),
  ``'--`` for missing values; fields bare (``case_submitter_id``, ``vital_status``) or dotted by entity
  (``cases.submitter_id``, ``demographic.vital_status``, ``diagnoses.days_to_last_follow_up``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.formats.clinical import months_event_from_days, receptor_labels
from hefeat.formats.common import need_columns, read_tsv, text_head, to_float

MANIFEST_FIELDS = ["id", "filename", "md5", "size", "state"]
SHEET_FIELDS = ["File ID", "File Name", "Project ID", "Case ID", "Sample ID"]
STAR_FIELDS = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
               "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]
STAR_VALUES = STAR_FIELDS[3:]
STAR_SUMMARY_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A gdc-client manifest: one row per file (id, filename, md5, size, state)."""
    df = read_tsv(path, "GDC manifest")
    need_columns(df, MANIFEST_FIELDS[:3], path, "GDC manifest")
    empty = df["filename"].str.strip().eq("")
    if empty.any():
        raise HefeatError(f"GDC manifest {Path(path).name}: field 'filename' is empty on data row {int(empty.idxmax()) + 1}")
    return df


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """MD5 of a file (hex), read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_sample_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """A GDC sample sheet, one row per (file, sample); refuses a case listed under two projects."""
    df = read_tsv(path, "GDC sample sheet")
    need_columns(df, SHEET_FIELDS, path, "GDC sample sheet")
    for f in SHEET_FIELDS:
        empty = df[f].str.strip().eq("")
        if empty.any():
            raise HefeatError(f"GDC sample sheet {Path(path).name}: field {f!r} is empty on data row {int(empty.idxmax()) + 1}")
    rows = []
    for r in df.to_dict("records"):
        cases = [c.strip() for c in r["Case ID"].split(",")]
        samples = [s.strip() for s in r["Sample ID"].split(",")]
        for i, s in enumerate(samples):
            rows.append({**r, "Sample ID": s, "Case ID": cases[min(i, len(cases) - 1)]})
    out = pd.DataFrame(rows)
    projects = out.groupby("Case ID")["Project ID"].unique()
    two = projects[projects.map(len) > 1]
    if len(two):
        raise HefeatError(f"GDC sample sheet {Path(path).name}: field 'Project ID' gives case {two.index[0]} two projects "
                          f"({', '.join(two.iloc[0])}); download one project per sample sheet")
    return out


def read_star_counts(path: str | os.PathLike) -> pd.DataFrame:
    """One STAR-Counts file: its gene rows (the N_* summary rows left out), values as float64."""
    head = text_head(path, "STAR-Counts file")
    if not head.startswith("# gene-model:"):
        raise HefeatError(f"STAR-Counts file {Path(path).name}: the first line is not '# gene-model: ...' "
                          "(not a GDC STAR - Counts file, or truncated)")
    df = read_tsv(path, "STAR-Counts file", comment=None, skiprows=1)
    need_columns(df, STAR_FIELDS, path, "STAR-Counts file")
    df = df[~df["gene_id"].isin(STAR_SUMMARY_ROWS)].reset_index(drop=True)
    if df.empty:
        raise HefeatError(f"STAR-Counts file {Path(path).name} has no gene rows (truncated?)")
    for c in STAR_VALUES:
        df[c] = to_float(df[c], path, c, "STAR-Counts file")
    return df


def strip_version(gene_id: pd.Series) -> pd.Series:
    """ENSG00000000003.15 -> ENSG00000000003 (a _PAR_Y suffix is kept: ENSG00000002586_PAR_Y)."""
    return gene_id.str.replace(r"\.\d+(?=$|_PAR_Y$)", "", regex=True)


def _locate(folder: Path, sheet: pd.DataFrame, sheet_path) -> dict[str, Path]:
    """File ID -> path: <folder>/<File ID>/<File Name> (the gdc-client layout), else the name anywhere below."""
    by_name: dict[str, Path] | None = None
    out = {}
    for fid, fname in sheet[["File ID", "File Name"]].drop_duplicates().itertuples(index=False):
        p = folder / fid / fname
        if not p.is_file():
            if by_name is None:
                by_name = {q.name: q for q in folder.rglob("*") if q.is_file()}
            p = by_name.get(fname)
        if p is None:
            raise HefeatError(f"GDC sample sheet {Path(sheet_path).name}: field 'File Name' names {fname} (File ID {fid}), "
                              f"which is not under {folder}; download it or drop its row")
        out[fid] = p
    return out


def star_counts_matrix(folder: str | os.PathLike, sample_sheet: str | os.PathLike, *, value: str = "tpm_unstranded",
                       gene_ids: str = "symbol") -> tuple[pd.DataFrame, list[str]]:
    """A GDC STAR-Counts download folder + its sample sheet -> (samples x genes DataFrame, notes).

    value: which column (tpm_unstranded, unstranded, fpkm_unstranded, ...). gene_ids='symbol' names
    genes by gene_name (a symbol on several Ensembl ids keeps the id with the highest mean, reported);
    'ensembl' keeps the Ensembl ids without version suffix. Several files of one sample are averaged
    (reported). Every file must be listed; every listed file must be there.
    """
    if value not in STAR_VALUES:
        raise HefeatError(f"--value {value!r} is not a STAR-Counts column; use one of {', '.join(STAR_VALUES)}")
    if gene_ids not in ("symbol", "ensembl"):
        raise HefeatError("gene ids must be 'symbol' or 'ensembl'")
    folder = Path(folder)
    sheet = read_sample_sheet(sample_sheet)
    paths = _locate(folder, sheet, sample_sheet)
    notes: list[str] = [f"GDC STAR-Counts: column {value}, {len(paths)} files"]
    ref: pd.DataFrame | None = None
    cols: dict[str, np.ndarray] = {}
    model = None
    for fid, p in paths.items():
        df = read_star_counts(p)
        m = text_head(p, "STAR-Counts file").splitlines()[0].split(":", 1)[1].strip()
        if model is None:
            model, ref = m, df[["gene_id", "gene_name"]]
        elif m != model or len(df) != len(ref) or not df["gene_id"].equals(ref["gene_id"]):
            short, full = (df, ref) if len(df) < len(ref) else (ref, df)
            if m == model and full["gene_id"].iloc[:len(short)].reset_index(drop=True).equals(
                    short["gene_id"].reset_index(drop=True)):
                which = p.name if short is df else paths[next(iter(paths))].name
                raise HefeatError(f"STAR-Counts file {which}: field 'gene_id' stops after {len(short)} of the "
                                  f"{len(full)} genes the other files list (truncated download?); download it again")
            raise HefeatError(f"STAR-Counts file {p.name}: field 'gene_id' lists other genes than {paths[next(iter(paths))].name} "
                              f"(gene models {model} vs {m}); ingest one GDC data release at a time")
        cols[fid] = df[value].to_numpy(np.float64)
    notes.append(f"gene model {model}")
    per_sample: dict[str, list[str]] = {}
    for fid, s in sheet[["File ID", "Sample ID"]].itertuples(index=False):
        per_sample.setdefault(s, []).append(fid)
    samples = sorted(per_sample)
    V = np.stack([np.mean([cols[f] for f in per_sample[s]], axis=0) for s in samples])
    reps = {s: f for s, f in per_sample.items() if len(f) > 1}
    if reps:
        notes.append(f"{len(reps)} samples have several files, averaged: " +
                     ", ".join(f"{s} ({len(f)})" for s, f in list(reps.items())[:4]))
    ens = strip_version(ref["gene_id"])
    names = ref["gene_name"].where(ref["gene_name"].str.strip() != "", ens) if gene_ids == "symbol" else ens
    wide = pd.DataFrame(V, index=pd.Index(samples, name="sample_id"), columns=names.to_numpy())
    if wide.columns.duplicated().any():
        mean = wide.mean(0).to_numpy()
        order = np.lexsort((np.arange(len(mean)), -mean))  # highest mean first, then file order
        first = ~pd.Index(wide.columns[order]).duplicated()
        keep = np.zeros(len(mean), bool)
        keep[order[first]] = True
        dup = sorted(set(wide.columns[~keep]))
        notes.append(f"{len(dup)} gene symbols on several Ensembl ids: kept the id with the highest mean "
                     f"({', '.join(dup[:5])}{' …' if len(dup) > 5 else ''})")
        wide = wide.loc[:, keep]
    return wide, notes


def clinical_table(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """GDC clinical.tsv -> one row per patient: patient_id, survival_months, event (+ receptor labels), notes."""
    df = read_tsv(path, "GDC clinical TSV")
    short = {}
    for c in df.columns:
        short.setdefault(c.split(".")[-1] if c.startswith(("cases.", "demographic.", "diagnoses.")) else c, c)
    if "case_submitter_id" not in short and "submitter_id" in short and short["submitter_id"].startswith("cases."):
        short["case_submitter_id"] = short["submitter_id"]
    need = ["case_submitter_id", "vital_status", "days_to_death", "days_to_last_follow_up"]
    missing = [n for n in need if n not in short]
    if missing:
        raise HefeatError(f"GDC clinical TSV {Path(path).name}: missing field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(m) for m in missing)} (has {', '.join(list(df.columns)[:6])})")
    notes: list[str] = []
    d = pd.DataFrame({
        "patient_id": df[short["case_submitter_id"]].str.strip(),
        "vital_status": df[short["vital_status"]].replace("'--", ""),
        "days_to_death": to_float(df[short["days_to_death"]], path, short["days_to_death"], "GDC clinical TSV"),
        "days_to_last_follow_up": to_float(df[short["days_to_last_follow_up"]], path, short["days_to_last_follow_up"],
                                           "GDC clinical TSV"),
    })
    if "project_id" in short:
        d["project_id"] = df[short["project_id"]]
        two = d.groupby("patient_id")["project_id"].nunique()
        if (two > 1).any():
            raise HefeatError(f"GDC clinical TSV {Path(path).name}: field 'project_id' gives case {two[two > 1].index[0]} "
                              "two projects")
    g = d.groupby("patient_id", sort=True)
    per = pd.DataFrame({
        "vital_status": g["vital_status"].agg(lambda s: next((v for v in s if v), "")),
        "days_to_death": g["days_to_death"].max(), "days_to_last_follow_up": g["days_to_last_follow_up"].max(),
    })
    if "project_id" in d:
        per["project_id"] = g["project_id"].first()
    per = per.join(months_event_from_days(per["vital_status"], per["days_to_death"], per["days_to_last_follow_up"]))
    n_unknown = int(per["survival_months"].isna().sum() + (per["event"].isna() & per["survival_months"].notna()).sum())
    if n_unknown:
        notes.append(f"survival: {n_unknown} patients without vital status or days kept missing")
    per = receptor_labels(per.reset_index(), notes)
    return per, notes
