"""The one registry of stage-2 methods: each method is registered once, everything else derives from it.

`hefeat fit <name>` (its options come from the Params fields), `hefeat fit --config` / `hefeat run`
(recipes name a registered method), `hefeat predict`, `hefeat report` (headline and plots) and the
model id prefix all look the method up here. Nothing dispatches on a kind string anywhere else.

Registering a method (a toy example; see tests/test_registry.py)::

    from dataclasses import dataclass
    from hefeat.learn.registry import FitResult, Method, Params, param, register

    @dataclass(frozen=True, kw_only=True)
    class ToyParams(Params):
        extraction_id: str = param(help="Extraction to read.", flag="--extraction")
        alpha: float = param(1.0, "Ridge penalty.")
        seed: int = param(0, "Seed of every random choice.")

        def validate(self):
            if self.alpha <= 0:
                raise HefeatError("--alpha must be > 0")

    def fit_toy(store, p: ToyParams, model_id: str) -> FitResult:
        ...  # assemble data (hefeat.learn.data), fit an estimator, evaluate
        return FitResult(summary={"n_slides": 40, "auc": 0.8}, tables={"metrics": df},
                         extraction_id=p.extraction_id)

    register(Method(name="toy", prefix="toy-", params=ToyParams, fit=fit_toy,
                    headline=lambda s: f"AUC {s['auc']:.3f}", summary="A toy method."))

The registry computes the model id (prefix + params + fingerprints of the inputs the params name:
fields called extraction_id, dataset, bulk_dataset, label, cohort_col, time_col, event_col are
recognised; anything else a fit reads goes in Method.inputs), returns the stored model when it exists (unless force), times the fit and persists the FitResult
(`index.json` last). A fit that can estimate nothing raises `NotEstimable` (a HefeatError: one line,
non-zero exit); a partial answer is returned with `notes` saying what could not be estimated and
what to change. Built-in methods register themselves on import; `_builtin()` imports them (add your
module there).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from hefeat.errors import HefeatError


class NotEstimable(HefeatError):
    """The method's design gives no answer on these data (e.g. one class in the test set)."""


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def param(default: Any = MISSING, help: str = "", *, flag: str | None = None, multiple: bool = False,
          choices: tuple | None = None, parse: Callable[[str], Any] | None = None, cli: bool = True,
          file: bool = False) -> Any:
    """A Params field: its default, its --help text and how the CLI spells it.

    flag: the option name (default --field-name); multiple: a repeated option (--trait A --trait B)
    for a tuple field; choices: allowed values; parse: turns a CLI/recipe string into the value
    (e.g. a gene-list file); cli=False keeps a field out of the generated command; file: the value
    may be a file path; when it names a file, it enters the model id by its content and is recorded
    by its name and digest only (so ids never depend on where the file or the store sits).
    """
    meta = {"help": help, "flag": flag, "multiple": multiple, "choices": choices, "parse": parse, "cli": cli,
            "file": file}
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata=meta)


class Params:
    """Base of every method's parameters (a frozen, keyword-only dataclass).

    __post_init__ coerces values to the declared types (lists -> tuples, "1,2,5" -> (1, 2, 5),
    numbers from strings) and then calls `validate()`, so a Params object is always valid.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is MISSING:
                raise HefeatError(f"{type(self).__name__}: {f.name} is required")
            object.__setattr__(self, f.name, _coerce(v, hints[f.name], f))
        self.validate()

    def validate(self) -> None:
        """Raise HefeatError for values the method cannot use (override)."""

    def to_dict(self) -> dict:
        """JSON-ready parameters (tuples as lists), as recorded with the model."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}

    def portable(self, *, for_id: bool) -> dict:
        """`to_dict()` with each field that may name a file (param(file=True)) by content when it names an
        existing file: its digest for the id (`for_id`), its file name and digest for the record; never the path."""
        d = self.to_dict()
        for f in dataclasses.fields(self):
            v = d.get(f.name)
            if f.metadata.get("file") and isinstance(v, str) and v:
                kind, p = None, Path(v)
                if not p.is_file() and ":" in v:  # KIND:FILE (split=holdout:test_patients.txt)
                    kind, rest = v.split(":", 1)
                    p = Path(rest)
                if not p.is_file():
                    continue  # not a file (e.g. genes=top:250); a method that needs one says so itself
                from hefeat.store.ids import file_digest

                digest = file_digest(p)
                d[f.name] = {**({"kind": kind} if kind else {}), **({} if for_id else {"file": p.name}),
                             "file_digest": digest}
        return d

    def replace(self, **changes) -> Params:
        """A copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _jsonable(v):
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def is_optional(tp) -> tuple[bool, Any]:
    """(True, T) for a type `T | None`, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce_value(v, tp, name: str, metadata: dict | None = None):
    """`v` as the declared type `tp` (numbers from strings, lists -> tuples); a one-line error names the key and type."""
    return _coerce(v, tp, types.SimpleNamespace(name=name, metadata=metadata or {}))


def _coerce(v, tp, f: dataclasses.Field):
    opt, base = is_optional(tp)
    name = f.name
    if opt and isinstance(v, str) and v.strip().lower() in ("none", "null"):
        v = None  # the CLI's way to say "not set" for an optional value
    if v is None:
        if opt or base is Any:
            return None
        raise HefeatError(f"{name} cannot be empty")
    parse = f.metadata.get("parse")
    if parse is not None and isinstance(v, str) and base is not str:
        v = parse(v)
        if v is None and opt:
            return None
    origin = typing.get_origin(base)
    if origin is tuple:
        args = typing.get_args(base)
        item = args[0] if args else str
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if not isinstance(v, list | tuple):
            v = [v]
        out = tuple(_scalar(x, item, name) for x in v)
        if len(args) >= 2 and args[-1] is not Ellipsis and len(out) != len(args):
            raise HefeatError(f"{name} needs {len(args)} values, got {len(out)}: {v}")
        return out
    v = _scalar(v, base, name)
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise HefeatError(f"{name} must be one of {', '.join(map(str, choices))}, got {v!r}")
    return v


def _scalar(v, tp, name: str):
    choices = None
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        tp = type(choices[0])
    try:
        if tp is bool:
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(v)
                v = v.lower() in ("true", "1", "yes")
            elif not isinstance(v, bool | int):
                raise ValueError(v)
            v = bool(v)
        elif tp is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(v)
            if isinstance(v, bool):
                raise ValueError(v)
            v = int(v)
        elif tp is float:
            if isinstance(v, bool):
                raise ValueError(v)
            v = float(v)
        elif tp is str:
            if not isinstance(v, str | int | float):
                raise ValueError(v)
            v = str(v)
    except (TypeError, ValueError):
        raise HefeatError(f"{name} must be {getattr(tp, '__name__', tp)}, got {v!r}") from None
    if choices is not None and v not in choices:
        raise HefeatError(f"{name} must be one of {', '.join(map(str, choices))}, got {v!r}")
    return v


def make_params(cls: type, raw: dict, *, where: str = "") -> Params:
    """Build `cls` from a dict (recipe params, CLI options); unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise HefeatError(f"Unknown parameters{' in ' + where if where else ''} for {cls.__name__}: {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except TypeError as e:  # a required field missing
        missing = [f.name for f in dataclasses.fields(cls) if f.default is MISSING and f.name not in raw]
        raise HefeatError(f"{cls.__name__}: missing {', '.join(missing) or str(e)}") from None


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a one-line HefeatError when value is outside [lo, hi] (open ends if asked)."""
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        lo_s = "(" if lo_open else "["
        hi_s = ")" if hi_open else "]"
        raise HefeatError(f"{name} must be in {lo_s}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_s}, got {value}")


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What a method's fit returns; the registry persists it as the model."""

    summary: dict
    tables: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    extraction_id: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """A registered stage-2 method.

    name: `hefeat fit <name>` and a recipe's `method:`; prefix: model id prefix (unique);
    params: the Params dataclass; fit(store, params, model_id) -> FitResult;
    headline(summary) -> the one line the paper would report; summary: one-line description;
    predict(store, model_id, *, slides, top) -> dict (None: predictions are made at fit time);
    plots(store, model_id, out_dir) -> list of PNG paths; inputs(store, params) -> extra
    fingerprints of what the fit reads beyond the generic ones (see `input_fingerprints`);
    truth: whether `--truth truth.json` (synthetic cohorts) scores its gene calls;
    units(params, column) -> the units of a per-tile/per-spot output column (for maps and colour bars);
    report(store, model_id, out_dir) -> dict: a method that builds its whole report itself.
    A kind whose results are made elsewhere (fine-tuning jobs: `hefeat finetune run`) registers
    without params/fit, for `hefeat predict` and `hefeat report`; it never appears under `hefeat fit`.
    """

    name: str
    prefix: str
    headline: Callable[[dict], str]
    summary: str
    params: type | None = None
    fit: Callable[..., FitResult] | None = None
    predict: Callable[..., dict] | None = None
    plots: Callable[..., list] | None = None
    inputs: Callable[..., dict] | None = None
    truth: bool = False
    example: str = ""
    units: Callable[[dict, str], str] | None = None
    report: Callable[..., dict] | None = None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; names, and the id prefixes of fitted methods, are unique (same name: replaced)."""
    if not method.prefix.endswith("-") or len(method.prefix) < 3:
        raise HefeatError(f"Method {method.name}: prefix must look like 'abc-', got {method.prefix!r}")
    if method.fit is not None:
        if not (dataclasses.is_dataclass(method.params) and issubclass(method.params, Params)):
            raise HefeatError(f"Method {method.name}: params must be a Params dataclass")
        for other in _METHODS.values():
            if other.name != method.name and other.prefix == method.prefix:
                raise HefeatError(f"Method {method.name}: prefix {method.prefix!r} is already used by {other.name}")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests registering a toy method clean up with this)."""
    _METHODS.pop(name, None)


def _builtin() -> None:
    # Each built-in module calls register() when imported; hefeat.plugins names them (a new one goes there).
    from hefeat.plugins import load_methods

    load_methods()


def methods() -> dict[str, Method]:
    """Every registered method by name (built-ins loaded on first use)."""
    _builtin()
    return dict(_METHODS)


def fittable() -> dict[str, Method]:
    """The methods `hefeat fit` and recipes can run (those with params and a fit)."""
    return {k: m for k, m in methods().items() if m.fit is not None}


def get_method(name: str) -> Method:
    """The method registered under `name`; a clear error naming the known ones otherwise."""
    m = methods().get(name)
    if m is None:
        raise HefeatError(f"Unknown method {name!r}; available: {', '.join(sorted(methods()))}")
    return m


def method_of(store, model_id: str) -> tuple[Method, dict]:
    """(method, model.json) of a stored model."""
    from hefeat.learn.models import load_model

    meta = load_model(store, model_id)
    return get_method(meta["kind"]), meta


def output_units(meta: dict, column: str) -> str:
    """Units of a stored model's per-tile output column (its method's `units`, else 'model output')."""
    m = methods().get(meta.get("kind", ""))
    return m.units(meta.get("params", {}), column) if m and m.units else "model output"


def require_kind(meta: dict, kind: str, what: str) -> None:
    """Raise a one-line error when a model is not of the kind a command needs."""
    if meta["kind"] != kind:
        raise HefeatError(f"Model {meta['model_id']} is a {meta['kind']} model; {what} needs a {kind} model "
                          f"(ids {get_method(kind).prefix}...)")


# ---------------------------------------------------------------------------------------------
# The one way to fit
# ---------------------------------------------------------------------------------------------
def fit_model(store, method: str | Method, params: Params | dict, *, force: bool = False,
              truth: str | Path | None = None) -> dict:
    """Fit (or load, when this exact model on these exact inputs exists) and return its summary.

    The summary has the same keys whether the model was fitted now or loaded (`cached` says which).
    """
    import time

    from hefeat.learn.data import input_fingerprints
    from hefeat.learn.models import model_summary
    from hefeat.store.ids import model_id
    from hefeat.store.models import discard_model, model_exists, save_model

    m = get_method(method) if isinstance(method, str) else method
    if m.fit is None:
        raise HefeatError(f"{m.name} results are not fitted with hefeat fit ({m.summary})")
    p = params if isinstance(params, m.params) else make_params(m.params, dict(params))
    fps = input_fingerprints(store, p)
    if m.inputs is not None:
        fps.update(m.inputs(store, p))
    mid = model_id(m.prefix, m.name, p.portable(for_id=True), fps)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True, truth=truth)
    discard_model(store, mid)  # a refit (--force) or the leftovers of an interrupted one
    t0 = time.perf_counter()
    res = m.fit(store, p, mid)
    summary = {"model_id": mid, "kind": m.name, **res.summary, "notes": list(res.notes)}
    save_model(store, mid, kind=m.name, params=p.portable(for_id=False), summary=summary, arrays=res.arrays, tables=res.tables,
               extraction_id=res.extraction_id, inputs=fps, seconds=round(time.perf_counter() - t0, 3))
    return model_summary(store, mid, cached=False, truth=truth)


def predict_model(store, model_id: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Write a model's predictions into the store (its method's predict); returns counts."""
    m, _ = method_of(store, model_id)
    if m.predict is None:
        raise HefeatError(f"{m.name} models have no separate prediction step: their predictions were written when "
                          f"fitted (models/{model_id}/ and the predictions view)")
    out = m.predict(store, model_id, slides=slides, top=top)
    store.compact_after_write("predictions", model_id)
    return out


def fit_text(summary: dict) -> str:
    """The CLI's paragraph for a fitted (or loaded) model: id, headline, notes, where the report is."""
    m = get_method(summary["kind"])
    cached = " (already fitted: loaded from the store)" if summary.get("cached") else ""
    lines = [f"Model {summary['model_id']} ({m.name}){cached}: {m.headline(summary)}"]
    if "signal_recall" in summary:
        lines.append(f"  truth: {summary['signal_recall']:.0%} of {summary['n_signal_evaluated']} signal genes called, "
                     f"{summary['null_false_calls']} of {summary['n_null_evaluated']} null genes called")
    lines += [f"  note: {n}" for n in summary.get("notes") or []]
    lines.append(f"Report: hefeat report {summary['model_id']}")
    return "\n".join(lines)
