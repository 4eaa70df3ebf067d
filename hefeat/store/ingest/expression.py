"""Expression matrices (tables, GDC, Xena, cBioPortal) into the catalog, matched to slides."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store
from hefeat.store.ids import check_id, file_fingerprint
from hefeat.store.ingest.common import (
    GENE_COLUMN_NAMES,
    IngestReport,
    first_line,
    numeric_block,
    read_table,
)


@dataclass
class ExpressionMatrix:
    """A validated expression table: samples x genes values and the shape it was read from."""

    sample_ids: list[str]
    genes: list[str]
    values: np.ndarray  # float32 (n_samples, n_genes), NaN = missing
    orientation: str


def _check_unique(names: list[str], what: str) -> None:
    s = pd.Index(names)
    if s.duplicated().any():
        raise HefeatError(f"Expression table has duplicate {what}: {sorted(set(s[s.duplicated()]))[:5]}; each must appear once")


def expression_matrix(df: pd.DataFrame, sample_col: str | None = None) -> ExpressionMatrix:
    """Parse an expression table in any of its three shapes into a validated matrix.

    Long (sample_id, gene, value columns); wide samples x genes (sample column first, or named by
    sample_col); wide genes x samples (first column named gene/symbol/...), read transposed.
    """
    cols = {str(c).lower(): c for c in df.columns}
    if {"sample_id", "gene", "value"} <= set(cols):
        long = df.rename(columns={cols["sample_id"]: "sample_id", cols["gene"]: "gene", cols["value"]: "value"})
        long = long[["sample_id", "gene", "value"]].copy()
        long["sample_id"], long["gene"] = long["sample_id"].astype(str), long["gene"].astype(str)
        dup = long.duplicated(["sample_id", "gene"])
        if dup.any():
            ex = long.loc[dup, ["sample_id", "gene"]].head(3).values.tolist()
            raise HefeatError(f"Expression table repeats (sample, gene) pairs, e.g. {ex}; each pair must appear once")
        vals = numeric_block(long[["value"]], long["sample_id"] + " / " + long["gene"], "Expression table")
        long["value"] = vals[:, 0]
        wide = long.pivot(index="sample_id", columns="gene", values="value")
        return ExpressionMatrix([str(s) for s in wide.index], [str(g) for g in wide.columns], wide.to_numpy(np.float32), "long")
    if df.shape[1] < 2:
        raise HefeatError("Expression table needs a sample column and at least one gene column (or sample_id, gene, value)")
    first = df.columns[0]
    if sample_col is None and str(first).lower() in GENE_COLUMN_NAMES:
        genes = df[first].astype(str).tolist()
        _check_unique(genes, "genes (rows)")
        samples = [str(c) for c in df.columns[1:]]
        _check_unique(samples, "samples (columns)")
        vals = numeric_block(df[df.columns[1:]], df[first].astype(str), "Expression table (genes x samples)")
        return ExpressionMatrix(samples, genes, vals.T.astype(np.float32), "genes x samples")
    sc = sample_col or next((cols[c] for c in ("sample_id", "sample", "slide_id", "patient_id") if c in cols), first)
    if sc not in df.columns:
        raise HefeatError(f"--sample-col {sc!r} is not a column of the expression table; it has {list(df.columns)[:6]}")
    samples = df[sc].astype(str)
    if samples.duplicated().any():
        raise HefeatError(f"Expression table has duplicate samples: {samples[samples.duplicated()].tolist()[:5]}; one row per sample expected")
    genes = [c for c in df.columns if c != sc]
    _check_unique([str(g) for g in genes], "gene columns")
    vals = numeric_block(df[genes], samples, "Expression table")
    return ExpressionMatrix(samples.tolist(), [str(g) for g in genes], vals.astype(np.float32), "samples x genes")


def _sample_map(store: Store, samples: list[str]) -> pd.DataFrame:
    """sample_id -> slide_id, patient_id (by slide id first, then by patient id), resolved as of now."""
    slides = store.sql("SELECT slide_id, patient_id FROM slides")
    s = pd.DataFrame({"sample_id": samples})
    by_slide = s.merge(slides, left_on="sample_id", right_on="slide_id", how="inner")
    rest = s[~s["sample_id"].isin(by_slide["sample_id"])]
    by_patient = rest.merge(slides, left_on="sample_id", right_on="patient_id", how="inner")
    return pd.concat([by_slide.assign(by="slide"), by_patient.assign(by="patient")],
                     ignore_index=True)[["sample_id", "slide_id", "patient_id", "by"]]


def _sample_pointers(mapping: pd.DataFrame) -> pd.DataFrame:
    """What `samples` stores: the slide or the patient a sample names (never a copy of the other);
    the `samples` view resolves them against `slides` when read (one patient identity)."""
    ptr = mapping.assign(slide_id=mapping["slide_id"].where(mapping["by"] == "slide"),
                         patient_id=mapping["patient_id"].where(mapping["by"] == "patient"))
    return ptr.drop_duplicates(["sample_id", "slide_id", "patient_id"])[["sample_id", "slide_id", "patient_id"]]


def ingest_expression(
    store: Store,
    path: str | os.PathLike,
    *,
    dataset: str = "expression",
    sample_col: str | None = None,
    allow_unmatched: bool = False,
    sample_types: Iterable[str] | None = None,
    slide_types: Iterable[str] | None = None,
) -> IngestReport:
    """Ingest bulk expression (wide samples x genes, wide genes x samples, or long) as dataset `dataset`.

    Samples are matched to slides by slide_id, then by patient_id; TCGA barcodes by sample (see
    `match_expression_samples`). Unmatched samples are an error
    (listing them) unless allow_unmatched. Non-numeric or infinite cells are an error naming them;
    empty cells are kept as missing. Re-ingesting replaces the dataset unless its content is the
    same (so re-ingesting the original after a bad file restores it).
    """
    store.require()
    check_id(dataset, "dataset")
    mat = expression_matrix(read_table(path), sample_col)
    return ingest_matrix(store, mat, path, dataset=dataset, allow_unmatched=allow_unmatched,
                         sample_types=sample_types, slide_types=slide_types)


def matrix_of(wide: pd.DataFrame, what: str) -> ExpressionMatrix:
    """A reader's samples x genes DataFrame (index = sample ids) as a validated matrix."""
    _check_unique([str(g) for g in wide.columns], "gene columns")
    _check_unique([str(s) for s in wide.index], "samples")
    vals = wide.to_numpy(np.float64)
    if np.isinf(vals).any():
        raise HefeatError(f"{what}: {int(np.isinf(vals).sum())} values are infinite; expression must be finite")
    return ExpressionMatrix([str(s) for s in wide.index], [str(g) for g in wide.columns], vals.astype(np.float32),
                   "samples x genes")


def match_expression_samples(store: Store, samples: list[str], *, sample_types: Iterable[str] | None = None,
                             slide_types: Iterable[str] | None = None) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """(mapping sample_id/slide_id/patient_id, unmatched samples, samples kept apart, notes).

    TCGA barcodes (when the store's slides carry barcodes too) match by sample: tumour type 01 and
    diagnostic (DX) slides by default, normals (11) and other types kept apart and reported; other
    ids match a slide_id, then a patient_id.
    """
    from hefeat.formats import tcga

    slides = store.sql("SELECT slide_id, patient_id, path FROM slides")
    if tcga.looks_like_barcodes(samples) and not tcga.slide_table(slides).empty:
        m = tcga.match_samples(samples, slides, sample_types=sample_types or tcga.DEFAULT_SAMPLE_TYPES,
                               slide_types=slide_types or tcga.DEFAULT_SLIDE_TYPES)
        apart = sorted(s for ids in m.other_type_samples.values() for s in ids)
        # a barcode names its sample's eligible slides: pointers to those slides, never to the whole patient
        return m.mapping.assign(by="slide"), m.unmatched_samples, apart, m.notes()
    if sample_types or slide_types:
        raise HefeatError("--sample-types / --slide-types need TCGA barcodes in both the sample ids and the slide file names")
    mapping = _sample_map(store, samples)
    return mapping, sorted(set(samples) - set(mapping["sample_id"])), [], []


def ingest_matrix(store: Store, mat: ExpressionMatrix, path: str | os.PathLike, *, dataset: str = "expression",
                  allow_unmatched: bool = False, sample_types: Iterable[str] | None = None,
                  slide_types: Iterable[str] | None = None, notes: list[str] | None = None,
                  source_file: str | os.PathLike | None = None) -> IngestReport:
    """Match a parsed matrix's samples to slides and write it as dataset `dataset` (see ingest_expression)."""
    from hefeat.store.expression import matrix_fingerprint, write_matrix

    store.require()
    check_id(dataset, "dataset")
    mapping, unmatched, apart, match_notes = match_expression_samples(store, mat.sample_ids, sample_types=sample_types,
                                                                      slide_types=slide_types)
    if apart:  # other sample types (normals ...) are not part of this dataset
        keep = [i for i, s in enumerate(mat.sample_ids) if s not in set(apart)]
        mat = ExpressionMatrix([mat.sample_ids[i] for i in keep], mat.genes, mat.values[keep], mat.orientation)
    if unmatched and not allow_unmatched:
        raise HefeatError(
            f"{len(unmatched)} of {len(mat.sample_ids)} samples match no slide or patient in the store: "
            f"{', '.join(unmatched[:8])}{' …' if len(unmatched) > 8 else ''}. Ingest those slides first, "
            "fix the ids, or pass --allow-unmatched to keep them anyway."
        )
    if mapping.empty:
        raise HefeatError("No sample of the expression table matches a slide or patient in the store")
    rep = IngestReport("expression", unmatched=unmatched, rows=int(mat.values.size),
                       notes=[*(notes or []), *match_notes])
    n_missing = int(np.isnan(mat.values).sum())
    if n_missing:
        rep.notes.append(f"{n_missing} empty cells kept as missing values")
    if mat.orientation == "genes x samples":
        rep.notes.append("read as genes x samples (first column names genes)")
    fp = matrix_fingerprint(mat.sample_ids, mat.genes, mat.values)
    cur = store.sql("SELECT fingerprint FROM expression_datasets WHERE dataset = ?", [dataset])
    old_map = store.sql("SELECT sample_id, slide_id, patient_id FROM samples WHERE dataset = ?", [dataset])
    cols = ["sample_id", "slide_id", "patient_id"]
    same_map = (old_map[cols].sort_values(cols[:2]).reset_index(drop=True)
                .equals(mapping[cols].sort_values(cols[:2]).reset_index(drop=True)))
    if len(cur) and cur["fingerprint"].iloc[0] == fp and same_map:
        rep.unchanged = [dataset]
        return rep
    src_fp = file_fingerprint(source_file or path)
    with store.connect(write=True) as con:
        write_matrix(con, dataset, mat.sample_ids, mat.genes, mat.values, source=str(Path(path).absolute()),
                     source_fingerprint=src_fp, orientation=mat.orientation)
        con.execute("DELETE FROM samples WHERE dataset = ?", [dataset])
        con.register("new_map", _sample_pointers(mapping).assign(dataset=dataset))
        con.execute("INSERT INTO samples SELECT dataset, sample_id, slide_id, patient_id FROM new_map")
        con.execute("INSERT INTO ingests VALUES (?, ?, ?, ?, now())", [f"expression:{dataset}", str(path), fp, mat.values.size])
    (rep.updated if len(cur) else rep.added).append(dataset)
    return rep


EXPRESSION_FORMATS = ("auto", "table", "gdc", "xena", "cbioportal")


def expression_format(path: str | os.PathLike) -> str:
    """The published layout of an expression input: gdc (a download folder), cbioportal, or table."""
    p = Path(path)
    if p.is_dir():
        return "gdc"
    head = first_line(p)
    if "Hugo_Symbol" in head and "Entrez_Gene_Id" in head:
        return "cbioportal"
    return "table"


def find_sample_sheet(folder: Path) -> Path:
    """The one gdc_sample_sheet*.tsv in a GDC download folder or next to it."""
    hits = sorted(folder.glob("gdc_sample_sheet*.tsv")) or sorted(folder.parent.glob("gdc_sample_sheet*.tsv"))
    if len(hits) != 1:
        raise HefeatError(f"{folder} is a GDC download folder: name its sample sheet with --sample-sheet "
                          f"({'found ' + ', '.join(h.name for h in hits) if hits else 'no gdc_sample_sheet*.tsv next to it'})")
    return hits[0]


def ingest_expression_source(
    store: Store,
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    dataset: str = "expression",
    sample_col: str | None = None,
    allow_unmatched: bool = False,
    value: str = "tpm_unstranded",
    gene_ids: str = "symbol",
    sample_sheet: str | os.PathLike | None = None,
    pseudocount: float = 1.0,
    sample_types: Iterable[str] | None = None,
    slide_types: Iterable[str] | None = None,
) -> IngestReport:
    """Ingest expression in a published layout: a GDC STAR-Counts folder (+ sample sheet), a UCSC Xena
    matrix, cBioPortal data_mrna_seq_v2_rsem.txt, or a plain table (`ingest_expression`).

    Every file is read and checked before the store changes.
    """
    from hefeat.formats import cbioportal, gdc, xena

    store.require()
    if fmt not in EXPRESSION_FORMATS:
        raise HefeatError(f"Unknown expression format {fmt!r}; use one of {', '.join(EXPRESSION_FORMATS)}")
    p = Path(path)
    if not p.exists():
        raise HefeatError(f"File not found: {p}")
    fmt = expression_format(p) if fmt == "auto" else fmt
    kw = dict(dataset=dataset, allow_unmatched=allow_unmatched, sample_types=sample_types, slide_types=slide_types)
    if fmt == "table":
        return ingest_expression(store, p, sample_col=sample_col, **kw)
    if fmt == "gdc":
        if not p.is_dir():
            raise HefeatError(f"--format gdc expects the GDC download folder (one folder per file id), not {p.name}")
        sheet = Path(sample_sheet) if sample_sheet else find_sample_sheet(p)
        wide, notes = gdc.star_counts_matrix(p, sheet, value=value, gene_ids=gene_ids)
        return ingest_matrix(store, matrix_of(wide, f"GDC STAR-Counts in {p.name}"), p, notes=notes,
                             source_file=sheet, **kw)
    if p.is_dir():
        raise HefeatError(f"{p} is a folder; --format {fmt} reads one file")
    if fmt == "xena":
        wide, notes = xena.xena_matrix(p, pseudocount=pseudocount)
    else:
        wide, notes = cbioportal.rsem_matrix(p)
    return ingest_matrix(store, matrix_of(wide, p.name), p, notes=notes, **kw)
