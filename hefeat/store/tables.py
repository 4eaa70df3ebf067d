"""Parquet I/O for the store (atomic)."""

from __future__ import annotations

import os

import pandas as pd

from hefeat.store.atomic import atomic_path


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, *, kind: str = "parquet") -> None:
    """Write a DataFrame as Parquet atomically (zstd); `kind` names its fault-injection points."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path, kind=kind) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, compression="zstd")
