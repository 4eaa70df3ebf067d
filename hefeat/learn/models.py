"""A fitted model's summary as the CLI shows it (with truth scores on a synthetic cohort).

The model records themselves (save / load / exists / discard) live in hefeat.store.models and are
re-exported here; model ids are minted by hefeat.store.ids.model_id.
"""

from __future__ import annotations

from pathlib import Path

from hefeat.store.catalog import Store
from hefeat.store.models import (  # noqa: F401  (re-exported: the records live in the store)
    discard_model,
    load_model,
    load_table,
    model_exists,
    save_model,
)


def truth_scores(store: Store, mid: str, truth: str | Path) -> dict:
    """Against a synthetic cohort's truth.json: share of signal genes called significant, null genes called."""
    import json

    t = json.loads(Path(truth).read_text())
    m = load_table(store, mid, "metrics").set_index("gene")
    sig = set(m.index[m["significant"]])
    signal = [x for x in t["signal_genes"] if x in m.index]
    null = [x for x in t["null_genes"] if x in m.index]
    return {"signal_recall": len(sig & set(signal)) / max(len(signal), 1), "null_false_calls": len(sig & set(null)),
            "n_signal_evaluated": len(signal), "n_null_evaluated": len(null)}


def model_summary(store: Store, mid: str, *, cached: bool, truth: str | Path | None = None) -> dict:
    """A stored model's summary with whether it was loaded instead of fitted, its fit time and truth scores."""
    meta = load_model(store, mid)
    s = {**meta["summary"], "cached": cached, "seconds": meta.get("seconds")}
    if truth:
        s.update(truth_scores(store, mid, truth))
    return s
