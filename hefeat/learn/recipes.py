"""Recipes: a YAML file naming a method and its parameters, run with `hefeat fit --config`."""

from __future__ import annotations

import dataclasses
import importlib

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

# method -> (module, parameter dataclass, fit function, whether it reads an extraction, takes --truth)
REGISTRY = {
    "genes": ("hefeat.learn.emo", "GenesParams", "fit_genes", True, True),
    "he2rna": ("hefeat.learn.he2rna", "He2rnaParams", "fit_he2rna", True, True),
    "transfer": ("hefeat.learn.transfer", "TransferParams", "fit_transfer", False, False),
    "spots": ("hefeat.learn.spots", "SpotsParams", "fit_spots", True, False),
    "traits": ("hefeat.learn.traits", "TraitsParams", "fit_traits", True, False),
    "receptors": ("hefeat.learn.receptors", "ReceptorParams", "fit_receptors", True, False),
}
METHODS = tuple(REGISTRY)


def param_class(method: str):
    """The parameter dataclass of a method."""
    if method not in REGISTRY:
        raise HefeatError(f"Unknown method {method!r}; available: {', '.join(METHODS)}")
    mod, cls, *_ = REGISTRY[method]
    return getattr(importlib.import_module(mod), cls)


def run_recipe(store: Store, cfg: dict, overrides: dict | None = None) -> dict:
    """Run the method named by cfg['method'] with cfg['params'] (+ overrides)."""
    method = cfg.get("method")
    cls = param_class(method)
    mod, _, fit_name, needs_extraction, takes_truth = REGISTRY[method]
    params = {**(cfg.get("params") or {}), **(overrides or {})}
    truth = params.pop("truth", None)
    if needs_extraction and not params.get("extraction_id"):
        eids = store.sql("SELECT extraction_id FROM extractions ORDER BY created")["extraction_id"].tolist()
        if len(eids) != 1:
            raise HefeatError(f"The recipe names no extraction_id and the store has {len(eids)} extractions; "
                              "pass --extraction or set params.extraction_id")
        params["extraction_id"] = eids[0]
    if not needs_extraction:
        params.pop("extraction_id", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise HefeatError(f"Unknown parameters for {cls.__name__}: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    fit = getattr(importlib.import_module(mod), fit_name)
    return fit(store, cls(**params), **({"truth": truth} if takes_truth else {}))
