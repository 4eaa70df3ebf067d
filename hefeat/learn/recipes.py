"""Recipes: a YAML file that runs a paper end to end (`hefeat run emo`, `hefeat fit --config emo`).

A recipe names a registered method, the tiling and the encoder the paper used, and the method's
parameters:

    method: genes
    tiling: {mpp: 0.226, size: 598}
    encoder: {name: inception_v3, weights: imagenet}
    params: {split: patient-kfold:5, seed: 0}

`run_recipe` tiles at the recipe's resolution and extracts with its encoder through the public
`run_extraction(..., tile_params=...)` (slides not tiled yet are tiled and embedded from one read of
each tile; work already in the store is reused: same tiling and extraction ids), then fits. A parameter may be `{recipe: NAME}`: that recipe runs first and its model id is
the value (transfer uses the HE2RNA model); `{recipe: NAME, params: {...}}` also overrides some of
that recipe's parameters. Every key is checked: unknown keys are errors, and a
recipe is never fitted on an extraction whose tiling or encoder differ from its own.

The recipes ship with the package (configs/ at the repository root is their one copy, installed as
`hefeat.configs`), so `hefeat run emo` works from any directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

RECIPE_KEYS = ("method", "description", "tiling", "encoder", "params")
# Encoder keys that decide the features (compared with an extraction's record); others only say how to run it.
ENCODER_IDENTITY = {"name": "encoder", "layer": "layer", "weights": "weights", "tta": "tta", "dtype": "dtype"}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: method, tiling and encoder sections (None when absent), parameters, overrides."""

    name: str
    path: str
    method: str
    params: dict
    tiling: dict | None = None
    encoder: dict | None = None
    description: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------------
def recipe_dir():
    """Where the packaged recipes are: the repository's configs/ in a source checkout, else `hefeat.configs`."""
    src = Path(__file__).resolve().parents[2] / "configs"
    if src.is_dir() and (src.parent / "pyproject.toml").exists():
        return src
    from importlib.resources import files

    return files("hefeat.configs")


def list_recipes() -> list[str]:
    """Names of the packaged recipes."""
    return sorted(p.name.removesuffix(".yaml") for p in recipe_dir().iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a file path or a packaged name (emo, he2rna, ...), with `section.key=value` overrides."""
    import yaml

    p = Path(ref)
    if p.is_file():
        text, name, where = p.read_text(), p.stem, str(p)
    else:
        name = ref.removesuffix(".yaml")
        res = recipe_dir() / f"{name}.yaml"
        if "/" in ref or not res.is_file():
            raise HefeatError(f"No recipe {ref!r}: not a file, and not a packaged recipe "
                              f"({', '.join(list_recipes())})")
        text, where = res.read_text(), f"{name} (packaged)"
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise HefeatError(f"Recipe {where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise HefeatError(f"Recipe {where} must be a mapping with keys {', '.join(RECIPE_KEYS)}")
    for o in overrides:
        _apply_override(cfg, o)
    return validate_recipe(cfg, name=name, path=where, overrides=tuple(overrides))


def _apply_override(cfg: dict, spec: str) -> None:
    """`section.key=value` (value in YAML) or `section={...}` to replace a whole section."""
    import yaml

    key, eq, raw = spec.partition("=")
    if not eq or not key.strip():
        raise HefeatError(f"--set needs section.key=value (e.g. encoder.name=resnet18), got {spec!r}")
    value = yaml.safe_load(raw) if raw.strip() else None
    path = key.strip().split(".")
    if path[0] not in RECIPE_KEYS:
        raise HefeatError(f"--set {spec}: unknown recipe section {path[0]!r}; sections: {', '.join(RECIPE_KEYS)}")
    node = cfg
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


def _tiling_fields() -> set[str]:
    from hefeat.slides.tiling import TilingParams

    return {f.name for f in dataclasses.fields(TilingParams)}


def _encoder_fields() -> set[str]:
    from hefeat.extract.pipeline import ExtractOptions, run_extraction

    skip = {"store", "tiling_id", "slides", "shard", "options", "encoder"}
    names = {n for n in inspect.signature(run_extraction).parameters if n not in skip}
    return names | {"name"} | {f.name for f in dataclasses.fields(ExtractOptions) if f.name != "extra"}


def _section_types(section: str) -> dict:
    """Declared types of a tiling or encoder section's keys: {key: type}."""
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.slides.tiling import TilingParams

    if section == "tiling":
        return typing.get_type_hints(TilingParams)
    out = {"name": str, **typing.get_type_hints(ExtractOptions)}
    for n, p in inspect.signature(run_extraction).parameters.items():
        with contextlib.suppress(NameError):  # annotations naming type-checking-only imports stay untyped
            out.setdefault(n, eval(p.annotation, run_extraction.__globals__) if isinstance(p.annotation, str) else p.annotation)
    return out


def _typed(where: str, key: str, value, tp, metadata=None):
    """A recipe value as its declared type (YAML 1.1 reads `3e-4` as a string); errors name the key and type."""
    from hefeat.learn.registry import coerce_value

    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return value  # a word here (weights: none = random init); YAML's own null is already None
    try:
        return coerce_value(value, tp, key, dict(metadata or {}))
    except HefeatError as e:
        raise HefeatError(f"Recipe {where}: {e}") from None


def validate_recipe(cfg: dict, *, name: str = "recipe", path: str = "", overrides: tuple[str, ...] = ()) -> Recipe:
    """Check every key of a recipe (sections, tiling, encoder, method parameters) and build a Recipe."""
    from hefeat.learn.registry import get_method

    where = path or name
    unknown = sorted(set(cfg) - set(RECIPE_KEYS))
    if unknown:
        raise HefeatError(f"Recipe {where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RECIPE_KEYS)}")
    if "method" not in cfg:
        hint = " (a fine-tuning recipe: hefeat finetune run --config ...)" if "task" in cfg else ""
        raise HefeatError(f"Recipe {where} needs a 'method' key{hint}")
    m = get_method(str(cfg["method"]))
    if m.fit is None:
        raise HefeatError(f"Recipe {where}: {m.name} is not a method hefeat fit runs ({m.summary})")
    for section, allowed in (("tiling", _tiling_fields), ("encoder", _encoder_fields)):
        sec = cfg.get(section)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise HefeatError(f"Recipe {where}: {section} must be a mapping")
        bad = sorted(set(sec) - allowed())
        if bad:
            raise HefeatError(f"Recipe {where}: unknown {section} key(s) {', '.join(bad)}; allowed: "
                              f"{', '.join(sorted(allowed()))}")
        types = _section_types(section)
        cfg[section] = {k: _typed(where, f"{section}.{k}", v, types[k]) if k in types else v for k, v in sec.items()}
    if cfg.get("encoder") is not None and not cfg["encoder"].get("name"):
        raise HefeatError(f"Recipe {where}: encoder needs a name")
    if bool(cfg.get("tiling")) != bool(cfg.get("encoder")):
        raise HefeatError(f"Recipe {where}: give both tiling and encoder (the extraction to make), or neither")
    params = dict(cfg.get("params") or {})
    names = {f.name for f in dataclasses.fields(m.params)}
    bad = sorted(set(params) - names)
    if bad:
        raise HefeatError(f"Recipe {where}: unknown parameters for {m.name}: {', '.join(bad)}; allowed: "
                          f"{', '.join(sorted(names))}")
    for k, v in params.items():
        if isinstance(v, dict) and not ("recipe" in v and set(v) <= {"recipe", "params"}):
            raise HefeatError(f"Recipe {where}: params.{k} must be a value or {{recipe: NAME}} (optionally with "
                              f"params: {{...}} overriding that recipe's parameters), got {v}")
    hints = typing.get_type_hints(m.params)
    meta = {f.name: f.metadata for f in dataclasses.fields(m.params)}
    for k, v in params.items():  # checked here, with a one-line error; the method's Params coerces them again
        if not isinstance(v, dict):
            _typed(where, f"params.{k}", v, hints[k], {m_: x for m_, x in meta[k].items() if m_ != "parse"})
    return Recipe(name=name, path=where, method=m.name, params=params, tiling=cfg.get("tiling"),
                  encoder=cfg.get("encoder"), description=str(cfg.get("description") or ""), overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run_recipe(store: Store, recipe: Recipe, *, extraction_id: str | None = None, truth: str | None = None,
               force: bool = False, progress: bool = False) -> dict:
    """Tile and extract as the recipe says (reusing what the store has), then fit; the summary records how."""
    from hefeat.learn.registry import fit_model, get_method

    m = get_method(recipe.method)
    params = dict(recipe.params)
    provenance: dict = {"recipe": recipe.name, "path": recipe.path, "overrides": list(recipe.overrides)}
    section_overrides = [o for o in recipe.overrides if o.split(".", 1)[0].split("=", 1)[0] in ("tiling", "encoder")]
    for k, v in list(params.items()):
        if isinstance(v, dict):  # {recipe: NAME}: run it first (same tiling/encoder overrides), use its model
            sub_over = section_overrides + [f"params.{pk}={json.dumps(pv)}" for pk, pv in (v.get("params") or {}).items()]
            sub = run_recipe(store, load_recipe(v["recipe"], sub_over), truth=None, force=False, progress=progress)
            params[k] = sub["model_id"]
            provenance.setdefault("requires", {})[k] = sub["recipe"] | {"model_id": sub["model_id"]}
    if "extraction_id" in {f.name for f in dataclasses.fields(m.params)}:
        eid = extraction_id or params.get("extraction_id")
        if eid:
            check_extraction(store, recipe, eid)
        elif recipe.tiling:
            eid = _tile_and_extract(store, recipe, provenance, progress=progress)
        else:
            eids = store.sql("SELECT extraction_id FROM extractions ORDER BY created")["extraction_id"].tolist()
            if len(eids) != 1:
                raise HefeatError(f"Recipe {recipe.name} names no tiling/encoder and the store has {len(eids)} "
                                  "extractions; pass --extraction or set params.extraction_id")
            eid = eids[0]
        params["extraction_id"] = eid
        provenance["extraction_id"] = eid
    s = fit_model(store, m, params, force=force, truth=truth)
    s["recipe"] = provenance
    return s


def _tile_and_extract(store: Store, recipe: Recipe, provenance: dict, *, progress: bool) -> str:
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.slides.tiling import TilingParams

    enc = dict(recipe.encoder)
    opt_names = {f.name for f in dataclasses.fields(ExtractOptions)}
    opts = {k: enc.pop(k) for k in list(enc) if k in opt_names}
    opts.setdefault("progress", progress)
    try:
        # Slides not tiled yet are tiled and embedded from one read of each tile (decode once).
        e = run_extraction(store, tile_params=TilingParams(**recipe.tiling), encoder=enc.pop("name"),
                           options=ExtractOptions(**opts), **enc)
    except HefeatError as err:  # say how to change the recipe's encoder from the command line
        raise HefeatError(f"{err} (recipe {recipe.name}: change its encoder with --set encoder.weights=PATH, "
                          "--set encoder.weights=none or --set encoder.name=...)") from None
    once = e.extra["decode_once"]
    t = once["tiling"]
    if t["failed"]:
        raise HefeatError(f"Recipe {recipe.name}: tiling failed for {len(t['failed'])} slides, e.g. "
                          f"{next(iter(t['failed'].items()))}; fix them or drop them from the store")
    tid = t["tiling_id"]
    if e.failed:
        raise HefeatError(f"Recipe {recipe.name}: extraction failed for {len(e.failed)} slides, e.g. "
                          f"{next(iter(e.failed.items()))}")
    provenance.update(tiling=dict(recipe.tiling), encoder=dict(recipe.encoder), tiling_id=tid,
                      tiled={"new": t["ok"], "reused": t["already_done"], "skipped": len(t["skipped"])},
                      extracted={"new": len(e.ok), "reused": len(e.done)},
                      decode_once={k: once[k] for k in ("used", "why", "tiles_read_once", "tiles_read_twice")})
    return e.extra["extraction_id"]


def _plain(v):
    """A value as JSON has it (tuples are lists), so a recipe's () equals a record's []."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_extraction(store: Store, recipe: Recipe, eid: str) -> None:
    """Refuse to fit a recipe on an extraction whose tiling or encoder differ from the recipe's."""
    if not recipe.tiling:
        store.extraction(eid)
        return
    from hefeat.extract.encoders import recorded_weights
    from hefeat.slides.run import tiling_id
    from hefeat.slides.tiling import TilingParams

    ext = store.extraction(eid)
    want = TilingParams(**recipe.tiling)
    diffs = []
    if tiling_id(want) != ext["tiling_id"]:
        have = store.tiling(ext["tiling_id"]).get("params", {})
        diffs += [f"tiling {k} {v!r} (extraction: {have.get(k)!r})" for k, v in want.to_dict().items()
                  if _plain(have.get(k)) != _plain(v)] or [f"tiling {want.to_dict()} (extraction: tiling {ext['tiling_id']})"]
    for k, rec_key in ENCODER_IDENTITY.items():
        if k in recipe.encoder:
            want_v, have_v = recipe.encoder[k], ext.get(rec_key)
            if k == "weights":  # compare what an extraction records (a preset's 'bundled' -> package:<name>)
                want_v = recorded_weights(recipe.encoder.get("name", ""), want_v)
                if want_v in (None, "imagenet") and have_v in (None, "imagenet"):
                    continue
            if want_v != have_v:
                diffs.append(f"encoder {k} {want_v!r} (extraction: {have_v!r})")
    if diffs:
        raise HefeatError(f"Recipe {recipe.name} does not match extraction {eid}: {'; '.join(diffs)}. Run "
                          f"`hefeat run {recipe.name}` to tile and extract as the recipe says, or fit this extraction "
                          f"directly with `hefeat fit {recipe.method} --extraction {eid}`")
