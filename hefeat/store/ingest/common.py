"""Shared pieces of every ingest: the report, reading a table, numeric blocks, MPP checks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError

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


def first_cells(df: pd.DataFrame, mask: np.ndarray, row_ids: pd.Series, n: int = 4) -> str:
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
                          f"{' …' if len(cols) > 6 else ''}), e.g. {first_cells(df, bad, row_ids)}")
    vals = num.to_numpy(np.float64)
    inf = np.isinf(vals)
    if inf.any():
        raise HefeatError(f"{what}: {int(inf.sum())} cells are infinite, e.g. {first_cells(df, inf, row_ids)}; "
                          "expression must be finite (leave a cell empty for a missing value)")
    if not allow_missing and np.isnan(vals).any():
        raise HefeatError(f"{what}: {int(np.isnan(vals).sum())} cells are empty, e.g. {first_cells(df, np.isnan(vals), row_ids)}")
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


def first_line(path: Path) -> str:
    """The first line of a text file (up to 64 KiB; empty when it cannot be read), to tell formats apart."""
    try:
        with open(path, "rb") as f:
            return f.readline(65536).decode("utf-8", "replace")
    except OSError:
        return ""
