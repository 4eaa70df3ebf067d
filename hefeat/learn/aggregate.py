"""Tile -> slide aggregations shared by every method: mean, fraction positive, majority vote, top-k."""

from __future__ import annotations

import numpy as np
import pandas as pd


def by_slide(values: np.ndarray, slides: np.ndarray, how: str = "mean", *, k: int = 10, threshold: float = 0.5) -> pd.Series:
    """Aggregate per-tile values (n,) to one value per slide: mean | fraction | topk."""
    df = pd.DataFrame({"slide": slides, "v": values})
    g = df.groupby("slide", sort=True)["v"]
    if how == "mean":
        return g.mean()
    if how == "fraction":
        return g.apply(lambda v: float((v > threshold).mean()))
    if how == "topk":
        return g.apply(lambda v: float(np.sort(v.to_numpy())[::-1][:k].mean()))
    raise ValueError(f"aggregation must be mean, fraction or topk, got {how!r}")


def majority_vote(votes: np.ndarray) -> np.ndarray:
    """Per-tile majority of binary votes (n_models, n_tiles) -> (n_tiles,) bool (ties -> False)."""
    votes = np.asarray(votes, bool)
    return votes.sum(0) * 2 > votes.shape[0]
