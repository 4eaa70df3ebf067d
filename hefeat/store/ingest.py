"""Bring slides, expression, clinical tables and spots into a store's catalog.

Every ingest validates the whole input before touching the catalog, writes in one transaction,
and either does what was asked or fails with a one-line error naming the offending rows or
columns; the previous data stays as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.ids import check_id, file_fingerprint, sanitize_id

MPP_RANGE = (0.05, 20.0)  # plausible level-0 µm/px: from 100x oil-immersion scans to 0.5x overview images
MPP_AGREE = 1e-3  # an --mpp within 0.1 % of what the slide states is the stated value, not an override
GENE_COLUMN_NAMES = ("gene", "genes", "gene_id", "gene_name", "gene_symbol", "symbol", "hugo_symbol", "ensembl_id")


@dataclass
class IngestReport:
    """What an ingest did: rows added, updated or already there, ids that matched nothing."""

    kind: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Summary for --json."""
        return {"kind": self.kind, "added": len(self.added), "updated": self.updated, "unchanged": len(self.unchanged),
                "unmatched": self.unmatched, "failed": self.failed, "rows": self.rows, "ids": self.added,
                "notes": self.notes}


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
        raise HefeatError(f"Cannot read {p.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    raise HefeatError(f"Unsupported table format {p.name}: expected .csv, .tsv or .parquet")


def _cells(df: pd.DataFrame, mask: np.ndarray, row_ids: pd.Series, n: int = 4) -> str:
    """'row r column c = v' for the first n cells of `mask`."""
    rr, cc = np.nonzero(mask)
    return "; ".join(f"{row_ids.iloc[r]} / {df.columns[c]} = {df.iat[r, c]!r}" for r, c in zip(rr[:n], cc[:n], strict=True))


def numeric_block(df: pd.DataFrame, row_ids: pd.Series, what: str, *, allow_missing: bool = True) -> np.ndarray:
    """float64 values of `df`, or a one-line error naming non-numeric or infinite cells (rows / columns)."""
    num = df.apply(pd.to_numeric, errors="coerce")
    bad = num.isna().to_numpy() & df.notna().to_numpy()
    if bad.any():
        cols = sorted({str(df.columns[c]) for c in np.nonzero(bad)[1]})
        raise HefeatError(f"{what}: {int(bad.sum())} cells are not numbers (columns {', '.join(cols[:6])}"
                          f"{' …' if len(cols) > 6 else ''}), e.g. {_cells(df, bad, row_ids)}")
    vals = num.to_numpy(np.float64)
    inf = np.isinf(vals)
    if inf.any():
        raise HefeatError(f"{what}: {int(inf.sum())} cells are infinite, e.g. {_cells(df, inf, row_ids)}; "
                          "expression must be finite (leave a cell empty for a missing value)")
    if not allow_missing and np.isnan(vals).any():
        raise HefeatError(f"{what}: {int(np.isnan(vals).sum())} cells are empty, e.g. {_cells(df, np.isnan(vals), row_ids)}")
    return vals


def check_mpp(value, where: str) -> float:
    """A level-0 µm/px that is a finite, plausible number, or a one-line error."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise HefeatError(f"{where}: MPP {value!r} is not a number (level-0 µm/px, e.g. 0.25)") from None
    if not math.isfinite(v) or not (MPP_RANGE[0] <= v <= MPP_RANGE[1]):
        raise HefeatError(f"{where}: MPP {value!r} is not a plausible level-0 µm/px "
                          f"(expected a finite number between {MPP_RANGE[0]} and {MPP_RANGE[1]}, e.g. 0.25)")
    return v


# ----------------------------------------------------------------------------------------------
# Slides
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Expression
# ----------------------------------------------------------------------------------------------
@dataclass
class _Matrix:
    sample_ids: list[str]
    genes: list[str]
    values: np.ndarray  # float32 (n_samples, n_genes), NaN = missing
    orientation: str


def _check_unique(names: list[str], what: str) -> None:
    s = pd.Index(names)
    if s.duplicated().any():
        raise HefeatError(f"Expression table has duplicate {what}: {sorted(set(s[s.duplicated()]))[:5]}; each must appear once")


def expression_matrix(df: pd.DataFrame, sample_col: str | None = None) -> _Matrix:
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
        return _Matrix([str(s) for s in wide.index], [str(g) for g in wide.columns], wide.to_numpy(np.float32), "long")
    if df.shape[1] < 2:
        raise HefeatError("Expression table needs a sample column and at least one gene column (or sample_id, gene, value)")
    first = df.columns[0]
    if sample_col is None and str(first).lower() in GENE_COLUMN_NAMES:
        genes = df[first].astype(str).tolist()
        _check_unique(genes, "genes (rows)")
        samples = [str(c) for c in df.columns[1:]]
        _check_unique(samples, "samples (columns)")
        vals = numeric_block(df[df.columns[1:]], df[first].astype(str), "Expression table (genes x samples)")
        return _Matrix(samples, genes, vals.T.astype(np.float32), "genes x samples")
    sc = sample_col or next((cols[c] for c in ("sample_id", "sample", "slide_id", "patient_id") if c in cols), first)
    if sc not in df.columns:
        raise HefeatError(f"--sample-col {sc!r} is not a column of the expression table; it has {list(df.columns)[:6]}")
    samples = df[sc].astype(str)
    if samples.duplicated().any():
        raise HefeatError(f"Expression table has duplicate samples: {samples[samples.duplicated()].tolist()[:5]}; one row per sample expected")
    genes = [c for c in df.columns if c != sc]
    _check_unique([str(g) for g in genes], "gene columns")
    vals = numeric_block(df[genes], samples, "Expression table")
    return _Matrix(samples.tolist(), [str(g) for g in genes], vals.astype(np.float32), "samples x genes")


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


def matrix_of(wide: pd.DataFrame, what: str) -> _Matrix:
    """A reader's samples x genes DataFrame (index = sample ids) as a validated matrix."""
    _check_unique([str(g) for g in wide.columns], "gene columns")
    _check_unique([str(s) for s in wide.index], "samples")
    vals = wide.to_numpy(np.float64)
    if np.isinf(vals).any():
        raise HefeatError(f"{what}: {int(np.isinf(vals).sum())} values are infinite; expression must be finite")
    return _Matrix([str(s) for s in wide.index], [str(g) for g in wide.columns], vals.astype(np.float32),
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


def ingest_matrix(store: Store, mat: _Matrix, path: str | os.PathLike, *, dataset: str = "expression",
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
        mat = _Matrix([mat.sample_ids[i] for i in keep], mat.genes, mat.values[keep], mat.orientation)
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


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.readline(65536).decode("utf-8", "replace")
    except OSError:
        return ""


def expression_format(path: str | os.PathLike) -> str:
    """The published layout of an expression input: gdc (a download folder), cbioportal, or table."""
    p = Path(path)
    if p.is_dir():
        return "gdc"
    head = _first_line(p)
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


# ----------------------------------------------------------------------------------------------
# Clinical
# ----------------------------------------------------------------------------------------------
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
    head = _first_line(Path(path))
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
        ex = df.loc[df.duplicated(["slide_id", "spot_id"]), ["slide_id", "spot_id"]].head(3).values.tolist()
        raise HefeatError(f"Spots table repeats (slide_id, spot_id) pairs, e.g. {ex}")
    ids = df["slide_id"] + ":" + df["spot_id"]
    xy = numeric_block(df[["x", "y"]], ids, "Spots table coordinates", allow_missing=False)
    if (xy < 0).any():
        raise HefeatError(f"Spots table has negative coordinates, e.g. {_cells(df[['x', 'y']], xy < 0, ids)}; "
                          "x, y are level-0 pixels of the spot centre")
    df["x"], df["y"] = xy[:, 0], xy[:, 1]
    genes = [c for c in df.columns if c not in need]
    counts = numeric_block(df[genes], ids, "Spots table counts") if genes else np.zeros((len(df), 0))
    df[genes] = counts
    known = set(store.sql("SELECT slide_id FROM slides")["slide_id"])
    unmatched = sorted(set(df["slide_id"]) - known)
    if unmatched and not allow_unmatched:
        raise HefeatError(f"Spots on slides not in the store: {', '.join(unmatched[:8])}. Ingest those slides first.")
    df = df[df["slide_id"].isin(known)]
    long = df.melt(id_vars=["slide_id", "spot_id"], value_vars=genes, var_name="gene", value_name="count")
    rep = IngestReport("spots", unmatched=unmatched, rows=len(df), added=sorted(df["slide_id"].unique()))
    with store.connect(write=True) as con:
        con.register("new_spots", df[["slide_id", "spot_id", "x", "y"]])
        con.register("new_counts", long)
        con.execute("DELETE FROM spots WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("DELETE FROM spot_counts WHERE slide_id IN (SELECT DISTINCT slide_id FROM new_spots)")
        con.execute("INSERT INTO spots SELECT slide_id, spot_id, x, y FROM new_spots")
        con.execute("INSERT INTO spot_counts SELECT slide_id, spot_id, gene, count FROM new_counts")
        con.execute("INSERT INTO ingests VALUES ('spots', ?, ?, ?, now())", [str(path), file_fingerprint(path), len(df)])
    return rep


def check_spot_set(spots: pd.DataFrame, counts, genes: list[str], *, width: int, height: int, where: str) -> None:
    """A reader's spots are unique, finite and inside the image (level-0 px); counts are finite and >= 0."""
    if spots["spot_id"].duplicated().any():
        raise HefeatError(f"{where}: spot {spots.loc[spots['spot_id'].duplicated(), 'spot_id'].iloc[0]} appears twice")
    xy = spots[["x", "y"]].to_numpy(float)
    bad = ~np.isfinite(xy).all(1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HefeatError(f"{where}: {int(bad.sum())} spot centres lie outside the {width} x {height} px image, e.g. "
                          f"{spots['spot_id'].iloc[i]} at ({xy[i, 0]:.0f}, {xy[i, 1]:.0f}); is it the image the spots "
                          "were registered to (full resolution)?")
    data = counts.data if hasattr(counts, "data") else np.asarray(counts)
    if not np.isfinite(data).all() or (data < 0).any():
        raise HefeatError(f"{where}: counts must be finite and >= 0")
    if counts.shape != (len(spots), len(genes)):
        raise HefeatError(f"{where}: counts are {counts.shape}, spots x genes are ({len(spots)}, {len(genes)})")


def write_spot_set(store: Store, slide_id: str, spots: pd.DataFrame, counts, genes: list[str], *,
                   spot_diameter_um: float, technology: str, source: str | os.PathLike) -> IngestReport:
    """Replace one slide's spots and counts (non-zero counts only: a missing (spot, gene) is 0) and record
    its technology and spot diameter, in one transaction."""
    import scipy.sparse as sp

    from hefeat.store.schema import SPOT_META_DDL

    store.require()
    coo = sp.coo_matrix(counts)
    nz = coo.data != 0
    long = pd.DataFrame({"slide_id": slide_id, "spot_id": spots["spot_id"].to_numpy()[coo.row[nz]],
                         "gene": np.asarray(genes, dtype=object)[coo.col[nz]], "count": coo.data[nz].astype(float)})
    sp_df = pd.DataFrame({"slide_id": slide_id, "spot_id": spots["spot_id"].astype(str),
                          "x": spots["x"].astype(float), "y": spots["y"].astype(float)})
    meta = pd.DataFrame([{"slide_id": slide_id, "technology": technology, "spot_diameter_um": float(spot_diameter_um),
                          "source": str(Path(source).absolute())}])
    with store.connect(write=True) as con:
        con.execute(SPOT_META_DDL)
        con.register("new_spots", sp_df)
        con.register("new_counts", long)
        con.register("new_meta", meta)
        con.execute("DELETE FROM spots WHERE slide_id = ?", [slide_id])
        con.execute("DELETE FROM spot_counts WHERE slide_id = ?", [slide_id])
        con.execute("DELETE FROM spot_meta WHERE slide_id = ?", [slide_id])
        con.execute("INSERT INTO spots SELECT slide_id, spot_id, x, y FROM new_spots")
        con.execute("INSERT INTO spot_counts SELECT slide_id, spot_id, gene, count FROM new_counts")
        con.execute("INSERT INTO spot_meta SELECT slide_id, technology, spot_diameter_um, source FROM new_meta")
        con.execute("INSERT INTO ingests VALUES ('spots', ?, NULL, ?, now())", [str(source), len(sp_df)])
    return IngestReport("spots", added=[slide_id], rows=len(sp_df))
