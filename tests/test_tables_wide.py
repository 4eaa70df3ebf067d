"""Wide Parquet tables (a gene per column) written from numpy columns read back exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.store.tables import WIDE, write_parquet


def test_wide_table_roundtrips_with_mixed_columns(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(7, WIDE + 5)), columns=[f"G{j:05d}" for j in range(WIDE + 5)])
    df.insert(0, "fold", pd.Categorical(list("abcabca")))
    df.insert(0, "sample_id", [f"s{i}" for i in range(7)])
    df["n"] = np.arange(7)
    df["f32"] = np.arange(7, dtype=np.float32)
    df.iloc[2, 5] = np.nan
    write_parquet(df, tmp_path / "w.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "w.parquet"), df)
