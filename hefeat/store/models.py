"""Fitted models as store records: models/<model_id>/{model.json, arrays.npz, <table>.parquet, index.json}.

save / load / exists / discard of a model. A model exists once its index record is there; that
record is written last, so a crash leaves either no model or a whole one (a re-fit discards the
leftovers first). File names come from hefeat.store.layout; ids from hefeat.store.ids.model_id.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat import __version__
from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.atomic import atomic_path, read_json, write_json
from hefeat.store.catalog import Store
from hefeat.store.runs import timestamp
from hefeat.store.tables import write_parquet


def model_exists(store: Store, mid: str) -> bool:
    """Whether a finished model with this id is in the store."""
    return layout.model_index_path(store.root, mid).exists()


def newest_model(store: Store, kind: str) -> tuple[str, int]:
    """(id of the most recently created model of this kind, how many of that kind there are); refuses when none."""
    m = store.sql(f"SELECT model_id FROM models WHERE kind = '{kind}' ORDER BY created DESC")
    if m.empty:
        raise HefeatError(f"No {kind} model in the store; run hefeat fit {kind} first")
    return str(m["model_id"].iloc[0]), len(m)


def discard_model(store: Store, mid: str) -> None:
    """Remove a model's files and predictions (before a refit); the index record goes first so it is never half-visible."""
    from hefeat.store.predictions import discard_predictions

    layout.model_index_path(store.root, mid).unlink(missing_ok=True)
    shutil.rmtree(layout.model_dir(store.root, mid), ignore_errors=True)
    discard_predictions(store, mid)


def save_model(store: Store, mid: str, *, kind: str, params: dict, summary: dict, arrays: dict | None = None,
               tables: dict[str, pd.DataFrame] | None = None, extraction_id: str | None = None,
               inputs: dict | None = None, seconds: float | None = None) -> Path:
    """Write a model's files; the index record goes last so a model is visible only when complete."""
    d = layout.model_dir(store.root, mid)
    d.mkdir(parents=True, exist_ok=True)
    if arrays:
        with atomic_path(layout.model_file(store.root, mid, layout.MODEL_ARRAYS), kind="model.arrays") as tmp, \
                open(tmp, "wb") as f:
            np.savez(f, **arrays)
    for name, df in (tables or {}).items():
        write_parquet(df, layout.model_table_path(store.root, mid, name), kind="model.table")
    created = timestamp()
    meta = {"model_id": mid, "kind": kind, "params": params, "summary": summary, "extraction_id": extraction_id,
            "inputs": inputs or {}, "created": created, "seconds": seconds, "code_version": __version__,
            "tables": sorted(tables or {})}
    write_json(layout.model_file(store.root, mid, layout.MODEL_META), meta, kind="model.meta")
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    index = {"model_id": mid, "kind": kind, "extraction_id": extraction_id, "created": created, "seconds": seconds,
             **flat}
    write_json(layout.model_index_path(store.root, mid), index, kind="model.index")  # the commit: written last
    store.compact_after_write("predictions", mid)
    return d


def load_model(store: Store, mid: str) -> dict:
    """model.json plus arrays (dict of ndarrays) of a stored model."""
    if not model_exists(store, mid):
        known = store.sql("SELECT model_id FROM models")["model_id"].tolist()
        raise HefeatError(f"No model {mid!r} in the store. Known: {', '.join(sorted(known)[:10]) or 'none'}")
    meta = read_json(layout.model_file(store.root, mid, layout.MODEL_META))
    arrays = layout.model_file(store.root, mid, layout.MODEL_ARRAYS)
    if arrays.exists():
        with np.load(arrays, allow_pickle=False) as z:
            meta["arrays"] = {k: z[k] for k in z.files}
    return meta


def load_table(store: Store, mid: str, name: str) -> pd.DataFrame:
    """A stored table of a model (metrics, predictions, ...)."""
    p = layout.model_table_path(store.root, mid, name)
    if not p.exists():
        raise HefeatError(f"Model {mid} has no table {name!r}")
    return pd.read_parquet(p)
