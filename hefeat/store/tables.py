"""Parquet I/O for the store (atomic)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from hefeat.cpus import available_cores
from hefeat.store.atomic import atomic_path

WIDE = 1000  # columns above which a frame is converted column by column from numpy
SLAB = 256  # tile side (rows and columns) when a wide float block is laid out column by column


def _float_runs(df: pd.DataFrame, floats: set[str]) -> list[tuple[int, int, np.dtype]]:
    """(start, stop, dtype) of each run of adjacent float columns of one dtype, by position."""
    runs: list[tuple[int, int, np.dtype]] = []
    for i, (c, dt) in enumerate(zip(df.columns, df.dtypes, strict=True)):
        if c not in floats:
            continue
        if runs and runs[-1][1] == i and runs[-1][2] == dt:
            runs[-1] = (runs[-1][0], i + 1, dt)
        else:
            runs.append((i, i + 1, dt))
    return runs


def _columns(df: pd.DataFrame, a: int, b: int, dt: np.dtype) -> np.ndarray:
    """Columns a:b (floats of dtype dt) as one (n, b - a) array: a view of the pandas block that holds them
    when there is one (the frame a fit builds around its predictions array), else a copy. pandas'
    column selections (df.iloc[:, a:b], df[cols]) copy samples x genes first."""
    try:
        for blk in df._mgr.blocks:
            s = blk.mgr_locs.as_slice if blk.mgr_locs.is_slice_like else None
            v = blk.values
            if (s is not None and s.step in (None, 1) and s.start <= a and b <= s.stop
                    and isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype == dt):
                return v[a - s.start:b - s.start].T
    except AttributeError:  # another pandas' internals: the copying way
        pass
    return df.iloc[:, a:b].to_numpy(dt)


def _column_major(block: np.ndarray) -> np.ndarray:
    """`block` (n, k) as a Fortran-ordered copy (each column contiguous, as Arrow needs it); returned as is
    when already so. Copied in SLAB x SLAB tiles, a group of SLAB columns per thread task (numpy's copies
    release the GIL): a plain strided copy walks the source down its columns, a page per element, 5x slower
    at 10,000 x 20,000."""
    if block.flags.f_contiguous:
        return block
    n, k = block.shape
    out = np.empty(block.shape, block.dtype, order="F")

    def copy(j: int) -> None:
        for i in range(0, n, SLAB):
            out[i:i + SLAB, j:j + SLAB] = block[i:i + SLAB, j:j + SLAB]

    groups = range(0, k, SLAB)
    workers = min(available_cores(), len(groups))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(copy, groups))
    else:
        for j in groups:
            copy(j)
    return out


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, *, kind: str = "parquet") -> None:
    """Write a DataFrame as Parquet atomically (zstd); `kind` names its fault-injection points.

    A wide table (a gene per column, e.g. 10,000 samples x 20,000 genes of out-of-fold predictions)
    stores its float columns uncompressed: zstd saves ~10 % on such floats (every mantissa differs) for
    more than half the write time and three times the read time; its other columns stay zstd.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    floats = {str(c) for c, t in df.dtypes.items() if pd.api.types.is_float_dtype(t)}
    wide = len(df.columns) > WIDE and df.columns.is_unique and all(isinstance(c, str) for c in df.columns)
    if wide:
        # Arrow arrays straight from the numpy columns; pandas' per-column conversion costs more than the
        # write. A run of adjacent float columns of one dtype (one pandas block: the frame a fit builds
        # around its predictions array) is read as a view, not copied by a column selection, then laid out
        # column by column once. The pandas metadata of a plain RangeIndex frame is not needed.
        at = {}
        for a, b, dt in _float_runs(df, floats):
            block = _column_major(_columns(df, a, b, dt))
            at.update({c: pa.array(block[:, j]) for j, c in enumerate(df.columns[a:b])})
        rest = [c for c in df.columns if c not in floats]
        if rest:
            other = pa.Table.from_pandas(df[rest], preserve_index=False)
            at.update({c: other.column(c) for c in rest})
        table = pa.Table.from_arrays([at[c] for c in df.columns], names=list(df.columns))
        compression = {c: "none" if c in floats else "zstd" for c in table.column_names}
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
        compression = "zstd"
    # Dictionary-encoding float columns never pays (every value differs) and doubles the write time.
    dictionary = [c for c in table.column_names if c not in floats] if floats else True
    with atomic_path(path, kind=kind) as tmp:
        pq.write_table(table, tmp, compression=compression, use_dictionary=dictionary)
