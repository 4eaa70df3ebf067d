"""What the explorer's routes share: parameter validation, read-side caches, value encoding, the request context."""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class BadRequest(HefeatError):
    """A request parameter that is missing or malformed (answered with 400)."""


# -- request parameters ---------------------------------------------------------------------------
def _arg(args, name: str, kind=str, *, default=None, lo=None, hi=None, choices=None, pattern: str | None = None):
    """One validated parameter; BadRequest (400) with a one-line reason otherwise."""
    import re

    raw = args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise BadRequest(f"missing parameter {name!r}")
        return default
    if kind is int:
        if not re.fullmatch(r"-?\d{1,9}", str(raw)):
            raise BadRequest(f"{name} must be an integer, got {str(raw)[:40]!r}")
        val = int(raw)
    elif kind is float:
        try:
            val = float(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number, got {str(raw)[:40]!r}") from None
        if not np.isfinite(val):
            raise BadRequest(f"{name} must be finite")
    elif kind is bool:
        if str(raw).lower() not in ("0", "1", "true", "false"):
            raise BadRequest(f"{name} must be 0 or 1")
        val = str(raw).lower() in ("1", "true")
    else:
        val = str(raw)
        if len(val) > 4000:
            raise BadRequest(f"{name} is too long")
    if lo is not None and val < lo or hi is not None and val > hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {val}")
    if choices is not None and val not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(map(str, choices))}")
    if pattern is not None and not re.fullmatch(pattern, val):
        raise BadRequest(f"{name} is not a valid id: {val[:40]!r}")
    return val


class Catalog:
    """Read-side caches over the store (slides, extractions, tiles per slide) so hover and tiles stay fast."""

    def __init__(self, store: Store, ttl: float = 5.0):
        self.store, self.ttl = store, ttl
        self._lock = threading.Lock()
        self._t: dict[str, tuple[float, object]] = {}

    def _cached(self, key: str, fn):
        with self._lock:
            hit = self._t.get(key)
            if hit and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        val = fn()
        with self._lock:
            self._t[key] = (time.monotonic(), val)
        return val

    def slides(self) -> pd.DataFrame:
        """slide_id, patient_id, site, path, width, height, mpp_x, indexed by slide_id."""
        return self._cached("slides", lambda: self.store.sql(
            "SELECT slide_id, patient_id, site, path, width, height, mpp_x FROM slides ORDER BY slide_id").set_index(
                "slide_id", drop=False))

    def slide(self, sid: str) -> pd.Series:
        """A catalogued slide's row; 400 for any other id."""
        s = self.slides()
        if sid not in s.index:
            raise BadRequest(f"unknown slide {sid[:60]!r}")
        return s.loc[sid]

    def extractions(self) -> pd.DataFrame:
        """Extractions with their tiling, encoder and dim."""
        return self._cached("extractions", lambda: self.store.sql(
            "SELECT * FROM extractions ORDER BY created").set_index("extraction_id", drop=False))

    def extraction(self, eid: str) -> dict:
        """An extraction's record; 400 for an unknown id."""
        e = self.extractions()
        if eid not in e.index:
            raise BadRequest(f"unknown extraction {eid[:60]!r}")
        return e.loc[eid].to_dict()

    def tiling(self, tid: str) -> dict:
        """A tiling's parameters (size, mpp, spots)."""
        return self._cached(f"tiling:{tid}", lambda: self.store.tiling(tid))

    def tiles(self, tid: str, sid: str) -> pd.DataFrame:
        """The slide's tiles on a tiling (re-read when the file changes)."""
        p = self.store.tiles_path(tid, sid)
        if not p.exists():
            raise BadRequest(f"slide {sid} has no tiles in tiling {tid}")
        return _read_tiles(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_tiles(path: str, _mtime: int) -> pd.DataFrame:
    return pd.read_parquet(path).set_index("tile_id", drop=False)


@functools.lru_cache(maxsize=8)
def _slide(path: str, mpp: float):
    from hefeat.slides.reader import Slide

    return Slide(path, mpp=mpp)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def encode_values(values: pd.Series, val, *, span: tuple[float, float] | None = None, span_of: str = "drawn") -> dict:
    """JSON for colouring: continuous (float32 base64, NaN = none) or categorical (codes + names).

    The colour range is `span` (e.g. the cohort's 2nd–98th percentile, so slides compare) or else the
    2nd–98th percentile of these values; `span_of` says which, and the shares beyond it are counted.
    """
    from hefeat.explore.values import numeric_or_categories
    from hefeat.figures.base import Scale, robust_scale

    kind, arr, names = numeric_or_categories(values)
    out = {"kind": kind, "label": val.label, "units": val.units, "title": val.title, "spec": val.spec,
           "n": len(arr)}
    if kind == "categorical":
        counts = np.bincount(arr[arr >= 0], minlength=len(names)) if len(names) else np.zeros(0, int)
        out.update(categories=names, counts=counts.tolist(), missing=int((arr < 0).sum()),
                   codes=_b64(arr.astype(np.int32)))
    else:
        sc = robust_scale(arr)
        if span is not None:
            fin = arr[np.isfinite(arr)]
            n = max(len(fin), 1)
            sc = Scale(span[0], span[1], float((fin < span[0]).sum() / n), float((fin > span[1]).sum() / n))
        out.update(vmin=sc.vmin, vmax=sc.vmax, span_of=span_of if span is not None else "drawn", clipped_low=sc.clipped_low, clipped_high=sc.clipped_high,
                   min=float(np.nanmin(arr)) if np.isfinite(arr).any() else None,
                   max=float(np.nanmax(arr)) if np.isfinite(arr).any() else None,
                   missing=int(np.isnan(arr).sum()), values=_b64(arr.astype(np.float32)))
    return out


def _json_body(request) -> dict:
    if not (request.content_type or "").startswith("application/json"):
        raise BadRequest("POST a JSON body (Content-Type: application/json)")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return {k: (str(v) if not isinstance(v, str) else v) for k, v in body.items()}


@functools.lru_cache(maxsize=4)
def _read_umap(path: str, _mtime: int) -> pd.DataFrame:
    return pd.read_parquet(path, columns=["slide_id", "tile_id", "umap_x", "umap_y"])




def _clinical(store: Store, cat: Catalog) -> dict:
    from hefeat.learn.data import clinical_by_slide

    def build():
        df = clinical_by_slide(store).set_index("slide_id")
        df = df.drop(columns=[c for c in ("patient_id", "site") if c in df.columns])
        return json.loads(df.to_json(orient="index"))

    return cat._cached("clinical", build)


_SPANS: dict = {}


def _cohort_span(store: Store, val, tiling_id: str):
    """Cached cohort colour range of a value on a tiling (recomputed when the store's files change)."""
    from hefeat.explore.values import cohort_range

    key = (str(store.root), val.spec, tiling_id)
    hit = _SPANS.get(key)
    if hit is None or time.monotonic() - hit[0] > 30:
        _SPANS[key] = hit = (time.monotonic(), cohort_range(store, val, tiling_id))
    return hit[1]


@dataclass
class Context:
    """One app's store, read-side caches, deep-zoom cache and page, and the helpers its routes share."""

    store: Store
    cat: Catalog
    dz: object
    page: str

    def a(self, name, kind=str, **kw):
        """A validated query-string parameter of the current request."""
        from flask import request

        return _arg(request.args, name, kind, **kw)

    def tiling_of(self, args_extraction: str | None, args_tiling: str | None) -> str:
        """The tiling named directly or through an extraction."""
        if args_extraction:
            return self.cat.extraction(args_extraction)["tiling_id"]
        if args_tiling:
            return args_tiling
        raise BadRequest("give extraction or tiling")

    def tile_of(self, eid: str, sid: str, tile: str) -> tuple[dict, pd.Series]:
        """An extraction's record and one of its tiles (400 if unknown)."""
        e = self.cat.extraction(eid)
        self.cat.slide(sid)
        t = _arg({"tile": tile}, "tile", int, lo=0)
        tiles = self.cat.tiles(e["tiling_id"], sid)
        if t not in tiles.index:
            raise BadRequest(f"tile {sid}:{t} does not exist in tiling {e['tiling_id']}")
        return e, tiles.loc[t]
