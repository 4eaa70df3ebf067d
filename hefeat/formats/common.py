"""Shared checks of the readers: text files that are what they claim, one-line errors naming file and field."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError


def text_head(path: str | os.PathLike, what: str, n: int = 4096) -> str:
    """The first bytes of a text file as text; refuses missing, empty, binary and HTML files in one line."""
    p = Path(path)
    if not p.is_file():
        raise HefeatError(f"{what}: file not found: {p}")
    raw = p.read_bytes()[:n] if p.suffix != ".gz" else __import__("gzip").open(p).read(n)
    if not raw.strip():
        raise HefeatError(f"{what} {p.name} is empty")
    if b"\x00" in raw:
        raise HefeatError(f"{what} {p.name} is a binary file, not a text table")
    text = raw.decode("utf-8", "replace")
    low = text.lstrip().lower()
    if low.startswith(("<!doctype html", "<html", "<?xml", "<head")) or "<html" in low[:512]:
        raise HefeatError(f"{what} {p.name} is an HTML/XML page (an error page saved by the browser?), "
                          "not a tab-separated table; download it again")
    return text


def need_columns(df: pd.DataFrame, need: list[str], path: str | os.PathLike, what: str) -> None:
    """One-line error naming the file and the missing fields."""
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise HefeatError(f"{what} {Path(path).name}: missing field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(m) for m in missing)} (has {', '.join(map(str, list(df.columns)[:8]))})")


def read_tsv(path: str | os.PathLike, what: str, **kw) -> pd.DataFrame:
    """A tab-separated file as strings (after the text checks); parse errors become one line naming the file."""
    text_head(path, what)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, **kw)
    except Exception as e:  # pandas' tokenizer errors: long rows, bad quoting, truncated gzip
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HefeatError(f"{what} {Path(path).name} cannot be read as a tab-separated table: {msg}") from None
    if len(df) and Path(path).suffix != ".gz":
        n = last_line(path).count("\t") + 1  # pandas pads a short row with '' like empty cells: count the fields
        if n < df.shape[1]:
            raise HefeatError(f"{what} {Path(path).name} ends mid-row: its last line has {n} of the {df.shape[1]} "
                              "fields (truncated download?); download it again")
    return df


def last_line(path: str | os.PathLike, block: int = 1 << 16) -> str:
    """The last non-empty line of a text file (read from its end, as far back as the line goes)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        while True:
            f.seek(max(0, size - block))
            tail = f.read().rstrip(b"\r\n")
            if b"\n" in tail or block >= size:
                return tail.rsplit(b"\n", 1)[-1].decode("utf-8", "replace")
            block *= 4


def to_float(s: pd.Series, path, field: str, what: str) -> pd.Series:
    """Numbers of one column; empty cells and TCGA/GDC markers ('--, [Not Available], NA) become NaN; text is an error."""
    v = s.astype(str).str.strip()
    missing = v.isin(["", "'--", "--", "NA", "NaN", "nan", "null", "None"]) | v.str.startswith("[")
    num = pd.to_numeric(v.where(~missing), errors="coerce")
    bad = num.isna() & ~missing
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise HefeatError(f"{what} {Path(path).name}: field {field!r} has {int(bad.sum())} values that are not numbers, "
                          f"e.g. {v.iloc[i]!r} on data row {i + 1}")
    return num
