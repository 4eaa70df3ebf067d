"""Matplotlib set-up shared by the exploration plots (headless)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_categorical(values) -> bool:
    """Non-numeric values, or few distinct integers, are drawn as categories."""
    import numpy as np
    import pandas as pd

    v = pd.Series(values)
    if not pd.api.types.is_numeric_dtype(v):
        return True
    u = v.dropna().unique()
    return len(u) <= 12 and np.allclose(u, np.round(u))
