"""Recipes: a YAML file naming a method and its parameters, run with `hefeat fit --config`."""

from __future__ import annotations

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

METHODS = ("genes", "he2rna", "transfer", "spots", "traits", "receptors")


def run_recipe(store: Store, cfg: dict, overrides: dict | None = None) -> dict:
    """Run the method named by cfg['method'] with cfg['params'] (+ overrides)."""
    cfg = dict(cfg)
    method = cfg.pop("method")
    params = {**(cfg.get("params") or {}), **(overrides or {})}
    truth = params.pop("truth", None)
    if method != "transfer" and not params.get("extraction_id"):
        eids = store.sql("SELECT extraction_id FROM extractions ORDER BY created")["extraction_id"].tolist()
        if len(eids) != 1:
            raise HefeatError("The recipe names no extraction_id and the store has "
                              f"{len(eids)} extractions; set params.extraction_id")
        params["extraction_id"] = eids[0]
    if method == "genes":
        from hefeat.learn.emo import GenesParams, fit_genes

        return fit_genes(store, _build(GenesParams, params), truth=truth)
    if method == "he2rna":
        from hefeat.learn.he2rna import He2rnaParams, fit_he2rna

        return fit_he2rna(store, _build(He2rnaParams, params), truth=truth)
    if method == "transfer":
        from hefeat.learn.transfer import TransferParams, fit_transfer

        params.pop("extraction_id", None)
        return fit_transfer(store, _build(TransferParams, params))
    if method in ("spots", "traits", "receptors"):
        fit = {"spots": ("hefeat.learn.spots", "fit_spots"), "traits": ("hefeat.learn.traits", "fit_traits"),
               "receptors": ("hefeat.learn.receptors", "fit_receptors")}[method]
        import importlib

        return getattr(importlib.import_module(fit[0]), fit[1])(store, _build(param_class(method), params))
    raise HefeatError(f"Unknown method {method!r}; available: {', '.join(METHODS)}")


def _build(cls, params: dict):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise HefeatError(f"Unknown parameters for {cls.__name__}: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**params)


def param_class(method: str):
    """The parameter dataclass of a method."""
    if method == "genes":
        from hefeat.learn.emo import GenesParams

        return GenesParams
    if method == "he2rna":
        from hefeat.learn.he2rna import He2rnaParams

        return He2rnaParams
    if method == "transfer":
        from hefeat.learn.transfer import TransferParams

        return TransferParams
    if method == "spots":
        from hefeat.learn.spots import SpotsParams

        return SpotsParams
    if method == "traits":
        from hefeat.learn.traits import TraitsParams

        return TraitsParams
    if method == "receptors":
        from hefeat.learn.receptors import ReceptorParams

        return ReceptorParams
    raise HefeatError(f"Unknown method {method!r}")
