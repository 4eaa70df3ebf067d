"""Fitted models in the store: models/<model_id>/{model.json, index.json, arrays.npz, *.parquet}."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hefeat import __version__
from hefeat.errors import HefeatError
from hefeat.store.atomic import atomic_path, read_json, write_json
from hefeat.store.catalog import Store
from hefeat.store.ids import content_id
from hefeat.store.runs import timestamp
from hefeat.store.tables import write_parquet


def model_id(prefix: str, kind: str, params: dict, inputs: dict) -> str:
    """Content-derived id: the same method, parameters and input data (fingerprints) give the same id."""
    return content_id({"kind": kind, "params": params, "inputs": inputs, "code": __version__}, prefix=prefix)


def model_exists(store: Store, mid: str) -> bool:
    """Whether a finished model with this id is in the store."""
    return (store.model_dir(mid) / "index.json").exists()


def discard_model(store: Store, mid: str) -> None:
    """Remove a model's files and predictions (before a refit); index.json goes first so it is never half-visible."""
    import shutil

    d = store.model_dir(mid)
    if (d / "index.json").exists():
        (d / "index.json").unlink()
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(store.predictions_path(mid, "x").parent, ignore_errors=True)


def save_model(store: Store, mid: str, *, kind: str, params: dict, summary: dict, arrays: dict | None = None,
               tables: dict[str, pd.DataFrame] | None = None, extraction_id: str | None = None,
               inputs: dict | None = None, seconds: float | None = None) -> Path:
    """Write a model's files; index.json goes last so a model is visible only when complete."""
    d = store.model_dir(mid)
    d.mkdir(parents=True, exist_ok=True)
    if arrays:
        with atomic_path(d / "arrays.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    for name, df in (tables or {}).items():
        write_parquet(df, d / f"{name}.parquet")
    created = timestamp()
    write_json(d / "model.json", {"model_id": mid, "kind": kind, "params": params, "summary": summary,
                                  "extraction_id": extraction_id, "inputs": inputs or {}, "created": created,
                                  "seconds": seconds, "code_version": __version__, "tables": sorted(tables or {})})
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    write_json(d / "index.json", {"model_id": mid, "kind": kind, "extraction_id": extraction_id, "created": created,
                                  "seconds": seconds, **flat})
    store.compact_after_write("predictions", mid)
    return d


def load_model(store: Store, mid: str) -> dict:
    """model.json plus arrays (dict of ndarrays) of a stored model."""
    d = store.model_dir(mid)
    if not (d / "index.json").exists():
        known = store.sql("SELECT model_id FROM models")["model_id"].tolist()
        raise HefeatError(f"No model {mid!r} in the store. Known: {', '.join(sorted(known)[:10]) or 'none'}")
    meta = read_json(d / "model.json")
    if (d / "arrays.npz").exists():
        with np.load(d / "arrays.npz", allow_pickle=False) as z:
            meta["arrays"] = {k: z[k] for k in z.files}
    return meta


def load_table(store: Store, mid: str, name: str) -> pd.DataFrame:
    """A stored table of a model (metrics, predictions, ...)."""
    p = store.model_dir(mid) / f"{name}.parquet"
    if not p.exists():
        raise HefeatError(f"Model {mid} has no table {name!r}")
    return pd.read_parquet(p)


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
