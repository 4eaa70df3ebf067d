"""Clinical fields shared by the cBioPortal and GDC readers: survival in months + event, receptor labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

DAYS_PER_MONTH = 365.25 / 12
# Receptor columns as TCGA writes them (BCR clinical, cBioPortal's TCGA studies) -> label column.
RECEPTOR_COLUMNS = {
    "er_status_by_ihc": "er_status", "pr_status_by_ihc": "pr_status", "her2_status_by_ihc": "her2_status",
    "ihc_her2": "her2_status", "her2_fish_status": "her2_fish_status",
}
RECEPTOR_VALUES = {"positive": 1.0, "negative": 0.0}
RECEPTOR_UNKNOWN = ("Equivocal", "Indeterminate", "[Not Evaluated]", "[Not Available]", "[Unknown]", "")


def receptor_labels(df: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Add er_status / pr_status / her2_status (1 = Positive, 0 = Negative, missing otherwise) from TCGA's columns.

    Equivocal, Indeterminate, [Not Evaluated], [Not Available] become missing and are counted in `notes`.
    """
    low = {str(c).lower(): c for c in df.columns}
    for src, dst in RECEPTOR_COLUMNS.items():
        if src not in low or (dst in low and dst != src):
            continue
        raw = df[low[src]].astype(str).str.strip()
        lab = raw.str.lower().map(RECEPTOR_VALUES)
        unknown = raw[lab.isna()]
        df[dst] = lab
        if len(unknown):
            counts = ", ".join(f"{v or 'empty'} {n}" for v, n in unknown.value_counts().items())
            notes.append(f"{dst} from {low[src]}: {int(lab.notna().sum())} labelled "
                         f"({int((lab == 1).sum())} positive), {len(unknown)} missing ({counts})")
    return df


def status_event(values: pd.Series, field: str, notes: list[str]) -> pd.Series:
    """cBioPortal status '1:DECEASED' / '0:LIVING' (or the words alone) -> 1.0 / 0.0; unknowns NaN, counted."""
    v = values.astype(str).str.strip()
    code = v.str.extract(r"^([01])\s*:", expand=False)
    words = v.str.upper().map({"DECEASED": "1", "DEAD": "1", "LIVING": "0", "ALIVE": "0", "RECURRED/PROGRESSED": "1",
                               "RECURRED": "1", "PROGRESSION": "1", "DISEASEFREE": "0", "CENSORED": "0"})
    ev = pd.to_numeric(code.fillna(words), errors="coerce")
    n_unknown = int(ev.isna().sum())
    if n_unknown:
        notes.append(f"{field}: {n_unknown} unknown values kept missing")
    return ev


def months_event_from_days(vital: pd.Series, to_death: pd.Series, to_follow_up: pd.Series) -> pd.DataFrame:
    """GDC fields -> survival_months (days to death if dead, else to last follow-up, / 30.44) and event."""
    dead = vital.astype(str).str.strip().str.lower().eq("dead")
    alive = vital.astype(str).str.strip().str.lower().eq("alive")
    days = np.where(dead, to_death, to_follow_up)
    event = np.where(dead, 1.0, np.where(alive, 0.0, np.nan))
    months = pd.Series(days, index=vital.index, dtype=float) / DAYS_PER_MONTH
    return pd.DataFrame({"survival_months": months.round(3), "event": event}, index=vital.index)
