"""Parquet I/O for the store (atomic)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from hefeat.store.atomic import atomic_path

WIDE = 1000  # columns above which a frame is converted column by column from numpy


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, *, kind: str = "parquet") -> None:
    """Write a DataFrame as Parquet atomically (zstd); `kind` names its fault-injection points."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    floats = {str(c) for c, t in df.dtypes.items() if pd.api.types.is_float_dtype(t)}
    if len(df.columns) > WIDE and df.columns.is_unique and all(isinstance(c, str) for c in df.columns):
        # A wide table (a gene per column): arrow arrays straight from the numpy columns; pandas' per-column
        # conversion costs more than the write. The pandas metadata of a plain RangeIndex frame is not needed.
        at = {}
        dtypes = df.dtypes  # (a new Series on every access)
        for dt in {dtypes[c] for c in floats}:  # one numpy block per float dtype
            fcols = [c for c in df.columns if c in floats and dtypes[c] == dt]
            block = np.asfortranarray(df[fcols].to_numpy(dt))
            at.update({c: pa.array(block[:, j]) for j, c in enumerate(fcols)})
        rest = [c for c in df.columns if c not in floats]
        if rest:
            other = pa.Table.from_pandas(df[rest], preserve_index=False)
            at.update({c: other.column(c) for c in rest})
        table = pa.Table.from_arrays([at[c] for c in df.columns], names=list(df.columns))
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
    # Dictionary-encoding float columns never pays (every value differs) and doubles the write time.
    dictionary = [c for c in table.column_names if c not in floats] if floats else True
    with atomic_path(path, kind=kind) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=dictionary)
