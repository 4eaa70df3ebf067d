"""The canonical spot set every spatial reader returns (Visium, HEST-1k, ST)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hefeat.errors import HefeatError


@dataclass
class SpotSet:
    """Spots of one section: centres in level-0 pixels of the full-resolution H&E, counts, physical scale.

    spots: DataFrame with spot_id, x, y (n_spots rows); counts: sparse (n_spots, n_genes);
    mpp: µm per full-resolution pixel (None when the data do not say; mpp_from says how the data give
    it); spot_diameter_um: the technology's spot (Visium 55 µm, ST 100 µm).
    """

    sample: str
    spots: pd.DataFrame
    counts: sp.csr_matrix
    genes: list[str]
    spot_diameter_um: float
    mpp: float | None
    technology: str
    image: Path | None
    source: Path
    notes: list[str] = field(default_factory=list)
    mpp_from: str = "spot geometry"  # where `mpp` comes from, e.g. "55 µm / spot_diameter_fullres"
    patient: str | None = None       # the patient the data name (HEST metadata), else the slide is its own


def sum_duplicate_genes(counts: sp.spmatrix, genes: list[str], notes: list[str]) -> tuple[sp.csr_matrix, list[str]]:
    """Counts of a gene name on several features summed into one column (reported in notes)."""
    idx = pd.Index(genes)
    if not idx.duplicated().any():
        return sp.csr_matrix(counts), list(genes)
    uniq, inv = np.unique(np.asarray(genes, dtype=object), return_inverse=True)
    order = pd.Index(genes).drop_duplicates()
    pos = pd.Index(uniq).get_indexer(order)
    agg = sp.csr_matrix((np.ones(len(genes)), (np.arange(len(genes)), inv)), shape=(len(genes), len(uniq)))
    out = (sp.csr_matrix(counts) @ agg)[:, pos]
    dup = sorted(set(idx[idx.duplicated()]))
    notes.append(f"{len(dup)} gene names on several features, counts summed ({', '.join(dup[:5])}"
                 f"{' …' if len(dup) > 5 else ''})")
    return sp.csr_matrix(out), list(order)


def check_scale(value, path, field_name: str, what: str, lo: float = 0.01, hi: float = 1e5) -> float:
    """A positive finite number from a metadata field, or a one-line error naming file and field."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not np.isfinite(v) or not (lo <= v <= hi):
        raise HefeatError(f"{what} {Path(path).name}: field {field_name!r} is {value!r}, not a usable number")
    return v
