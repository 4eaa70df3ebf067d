"""`hefeat explore`: a local, read-only web app over a store, served by waitress.

Safety rules (each has a test):
- bound to 127.0.0.1 by default; every request's Host header must name an allowed host, so a
  DNS-rebinding page cannot talk to it; POSTs must be JSON from an allowed origin;
- GET never writes: computing a UMAP or a neighbour index is an explicit POST (or CLI step);
- no file route: only deep-zoom tiles of catalogued slides, images of catalogued tiles and the
  package's own static files are served; the catalog and the store's files are unreachable;
- every parameter is validated; errors are JSON with status 400 (never an HTML page);
- SQL typed on the page runs through the store's read-only sandbox.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import threading
import time
from importlib import resources

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class BadRequest(HefeatError):
    """A request parameter that is missing or malformed (answered with 400)."""


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """WSGI middleware: refuse requests whose Host (or, for writes, Origin) is not an allowed host."""

    def __init__(self, app, allowed: set[str]):
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    def _refuse(self, start_response, msg: str):
        body = json.dumps({"error": msg}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ, start_response):
        host = environ.get("HTTP_HOST", "")
        if _host_name(host) not in self.allowed:
            return self._refuse(start_response, f"Host {host!r} is not allowed (DNS-rebinding protection); "
                                                f"open http://127.0.0.1:<port>/ or start with --allow-host")
        origin = environ.get("HTTP_ORIGIN")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD", "OPTIONS") and origin:
            from urllib.parse import urlsplit

            if (urlsplit(origin).hostname or "").lower() not in self.allowed:
                return self._refuse(start_response, f"Origin {origin!r} is not allowed to change the store")
        return self.app(environ, start_response)


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


def create_app(store: Store, *, allowed_hosts: tuple[str, ...] = ()):
    """The WSGI app for a store (Flask routes behind the Host check)."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    from hefeat.explore.deepzoom import DeepZoomCache

    store.require()
    static = resources.files("hefeat.explore").joinpath("static")
    app = Flask(__name__, static_folder=str(static), static_url_path="/static")
    app.json.sort_keys = False
    app.url_map.merge_slashes = False  # '//etc/passwd' is a 404, not a redirect
    app.url_map.strict_slashes = False
    cat = Catalog(store)
    dz = DeepZoomCache()
    page = static.joinpath("index.html").read_text()

    @app.errorhandler(HefeatError)
    def _bad(e):
        return jsonify({"error": str(e)}), 400

    @app.errorhandler(HTTPException)
    def _http(e):
        return jsonify({"error": f"{e.code} {e.name}: {e.description}"}), e.code

    @app.errorhandler(Exception)
    def _crash(e):
        app.logger.exception("explorer error")
        return jsonify({"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"}), 500

    @app.after_request
    def _headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; "
                                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-eval'; worker-src 'self' blob:; "
                                "connect-src 'self'; frame-ancestors 'none'")
        return resp

    def a(name, kind=str, **kw):
        return _arg(request.args, name, kind, **kw)

    def tiling_of(args_extraction: str | None, args_tiling: str | None) -> str:
        if args_extraction:
            return cat.extraction(args_extraction)["tiling_id"]
        if args_tiling:
            return args_tiling
        raise BadRequest("give extraction or tiling")

    # -- page and lists ------------------------------------------------------------------------
    @app.get("/")
    def index():
        return Response(page, mimetype="text/html")

    @app.get("/api/extractions")
    def extractions():
        e = cat.extractions()
        n = store.sql("SELECT extraction_id, count(*) AS slides, sum(n_tiles) AS tiles FROM features_index GROUP BY 1")
        e = e.reset_index(drop=True).merge(n, on="extraction_id", how="left")
        cols = [c for c in ("extraction_id", "tiling_id", "encoder", "layer", "dim", "slides", "tiles") if c in e]
        return jsonify(json.loads(e[cols].to_json(orient="records")))

    @app.get("/api/slides")
    def slides():
        s = cat.slides().reset_index(drop=True)
        return jsonify(json.loads(s[["slide_id", "patient_id", "site", "width", "height", "mpp_x"]].to_json(orient="records")))

    @app.get("/api/values")
    def values():
        from hefeat.explore.values import value_options

        tid = tiling_of(a("extraction", default="", pattern=_ID + "|"), a("tiling", default="", pattern=_ID + "|"))
        uid = a("umap", default="", pattern=_ID + "|") or None
        return jsonify(value_options(store, tid, umap_id=uid))

    # -- UMAP ----------------------------------------------------------------------------------
    @app.get("/api/umaps")
    def umaps():
        from hefeat.explore.umap_map import describe, list_umaps

        eid = a("extraction", pattern=_ID)
        cat.extraction(eid)
        return jsonify([{**u, "what": describe(u)} for u in list_umaps(store, eid)])

    @app.post("/api/umap")
    def umap_compute():
        from hefeat.explore.umap_map import run_umap

        body = _json_body(request)
        eid = _arg(body, "extraction", pattern=_ID)
        cat.extraction(eid)
        res = run_umap(store, eid, sample=_arg(body, "sample", int, default=100_000, lo=5, hi=2_000_000),
                       pca=_arg(body, "pca", int, default=50, lo=2, hi=512),
                       seed=_arg(body, "seed", int, default=0, lo=0, hi=2**31 - 1),
                       n_neighbors=_arg(body, "n_neighbors", int, default=15, lo=2, hi=200),
                       min_dist=_arg(body, "min_dist", float, default=0.1, lo=0.0, hi=1.0),
                       clusters=_arg(body, "clusters", int, default=8, lo=1, hi=50))
        return jsonify(res)

    def umap_rows(uid: str) -> tuple[dict, pd.DataFrame]:
        from hefeat.explore.umap_map import umap_info

        info = umap_info(store, uid)
        return info, _read_umap(str(store.umap_path(uid)), store.umap_path(uid).stat().st_mtime_ns)

    @app.get("/api/umap/<uid>")
    def umap_meta(uid):
        from hefeat.explore.umap_map import describe

        _arg({"umap": uid}, "umap", pattern=_ID)
        info, rows = umap_rows(uid)
        slides = list(dict.fromkeys(rows["slide_id"]))
        return jsonify({**info, "what": describe(info), "slides": slides,
                        "bounds": [float(rows["umap_x"].min()), float(rows["umap_x"].max()),
                                   float(rows["umap_y"].min()), float(rows["umap_y"].max())]})

    @app.get("/api/umap/<uid>/points.bin")
    def umap_points(uid):
        """float32 x[n], float32 y[n], int32 slide index[n] (into /api/umap/<id>'s slides), int32 tile_id[n]."""
        _arg({"umap": uid}, "umap", pattern=_ID)
        _, rows = umap_rows(uid)
        codes = pd.Categorical(rows["slide_id"], categories=list(dict.fromkeys(rows["slide_id"]))).codes
        parts = [rows["umap_x"].to_numpy(np.float32), rows["umap_y"].to_numpy(np.float32),
                 codes.astype(np.int32), rows["tile_id"].to_numpy(np.int32)]
        return Response(b"".join(np.ascontiguousarray(p).astype("<" + p.dtype.str[1:]).tobytes() for p in parts),
                        mimetype="application/octet-stream")

    @app.get("/api/umap/<uid>/values")
    def umap_values(uid):
        from hefeat.explore.values import values_for

        _arg({"umap": uid}, "umap", pattern=_ID)
        info, rows = umap_rows(uid)
        spec = a("value")
        vals, val = values_for(store, spec, rows, tiling_id=info.get("tiling_id") or cat.extraction(
            info["extraction_id"])["tiling_id"])
        return jsonify(encode_values(vals, val))

    # -- slides: deep zoom and overlays --------------------------------------------------------
    @app.get("/dz/<slide>.dzi")
    def dzi(slide):
        row = cat.slide(slide)
        return Response(dz.dzi(row["path"]), mimetype="application/xml")

    @app.get("/dz/<slide>_files/<level>/<tile>.jpeg")
    def dz_tile(slide, level, tile):
        row = cat.slide(slide)
        lv = _arg({"level": level}, "level", int, lo=0, hi=64)
        c, _, r = tile.partition("_")
        col, rw = _arg({"col": c}, "col", int, lo=0), _arg({"row": r}, "row", int, lo=0)
        resp = Response(dz.tile(row["path"], lv, col, rw), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    @app.get("/api/slide/<slide>")
    def slide_info(slide):
        row = cat.slide(slide)
        b = dz.bounds(row["path"])
        tilings = [t for t in store.sql("SELECT tiling_id FROM tilings")["tiling_id"] if store.tiles_path(t, slide).exists()]
        return jsonify({"slide_id": slide, "patient_id": row["patient_id"], "site": row["site"],
                        "mpp": float(row["mpp_x"]), "bounds": b, "tilings": tilings})

    @app.get("/api/tiles")
    def tiles_geometry():
        sid = a("slide", pattern=_ID)
        cat.slide(sid)
        tid = tiling_of(a("extraction", default="", pattern=_ID + "|"), a("tiling", default="", pattern=_ID + "|"))
        t = cat.tiles(tid, sid)
        return jsonify({"slide_id": sid, "tiling_id": tid, "tiles": len(t), "x": _b64(t["x"].to_numpy(np.float32)),
                        "y": _b64(t["y"].to_numpy(np.float32)), "size0": _b64(t["size0"].to_numpy(np.float32)),
                        "tile_id": _b64(t["tile_id"].to_numpy(np.int32))})

    @app.get("/api/overlay")
    def overlay():
        from hefeat.explore.values import values_for

        sid = a("slide", pattern=_ID)
        cat.slide(sid)
        tid = tiling_of(a("extraction", default="", pattern=_ID + "|"), a("tiling", default="", pattern=_ID + "|"))
        tiles = cat.tiles(tid, sid).reset_index(drop=True)
        keys = tiles[["tile_id"]].assign(slide_id=sid)
        vals, val = values_for(store, a("value"), keys, tiling_id=tid)
        span = _cohort_span(store, val, tid)
        out = encode_values(vals, val, span=span, span_of="cohort")
        out.update(tiling_id=tid, slide_id=sid, tile_id=_b64(tiles["tile_id"].to_numpy(np.int32)), tiles=len(tiles))
        return jsonify(out)

    # -- tiles ---------------------------------------------------------------------------------
    def tile_of(eid: str, sid: str, tile: str) -> tuple[dict, pd.Series]:
        e = cat.extraction(eid)
        cat.slide(sid)
        t = _arg({"tile": tile}, "tile", int, lo=0)
        tiles = cat.tiles(e["tiling_id"], sid)
        if t not in tiles.index:
            raise BadRequest(f"tile {sid}:{t} does not exist in tiling {e['tiling_id']}")
        return e, tiles.loc[t]

    @app.get("/api/tile/<eid>/<slide>/<tile>.png")
    def tile_png(eid, slide, tile):
        from PIL import Image

        e, t = tile_of(eid, slide, tile)
        size = a("size", int, default=0, lo=0, hi=1024)
        tl = cat.tiling(e["tiling_id"])
        row = cat.slide(slide)
        img = _slide(row["path"], float(row["mpp_x"])).read(float(t["x"]), float(t["y"]), int(tl["size"]), float(tl["mpp"]))
        im = Image.fromarray(img)
        if size and size < im.width:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        resp = Response(buf.getvalue(), mimetype="image/png")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    @app.get("/api/tile/<eid>/<slide>/<tile>")
    def tile_json(eid, slide, tile):
        from hefeat.explore.values import clinical_columns

        e, t = tile_of(eid, slide, tile)
        row = cat.slide(slide)
        info = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in t.items()}
        info.update(slide_id=slide, patient_id=row["patient_id"], site=row["site"], tiling_id=e["tiling_id"])
        if clinical_columns(store):
            info["clinical"] = _clinical(store, cat).get(slide, {})
        return jsonify(info)

    # -- neighbours ----------------------------------------------------------------------------
    @app.get("/api/indexes")
    def indexes():
        eid = a("extraction", pattern=_ID)
        df = store.sql("SELECT * FROM indexes WHERE extraction_id = ? ORDER BY created DESC", [eid])
        return jsonify(json.loads(df.to_json(orient="records")))

    @app.post("/api/index")
    def index_build():
        from hefeat.explore.neighbors import INDEX_TYPES, build_index

        body = _json_body(request)
        eid = _arg(body, "extraction", pattern=_ID)
        cat.extraction(eid)
        return jsonify(build_index(store, eid, index=_arg(body, "index", default="auto", choices=INDEX_TYPES)))

    @app.get("/api/neighbors")
    def neighbors():
        from hefeat.explore.neighbors import query

        eid = a("extraction", pattern=_ID)
        _, _ = tile_of(eid, a("slide", pattern=_ID), a("tile"))
        exclude = a("exclude", default="self", choices=("none", "self", "slide", "patient"))
        res = query(store, extraction_id=eid, tile=(a("slide"), a("tile", int)), k=a("k", int, default=12, lo=1, hi=200),
                    include_self=exclude == "none", exclude_same_slide=exclude == "slide",
                    exclude_same_patient=exclude == "patient")
        cols = ["rank", "slide_id", "tile_id", "distance", "patient_id", "site", "x", "y"]
        return jsonify({"metric": res.attrs.get("metric"), "index_id": res.attrs.get("index_id"),
                        "distance": "1 - cosine similarity" if res.attrs.get("metric") == "cosine" else "Euclidean",
                        "rows": json.loads(res[cols].to_json(orient="records"))})

    return HostCheck(app, set(LOCAL_HOSTS) | set(allowed_hosts))


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


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8765, threads: int = 4,
          allow_hosts: tuple[str, ...] = ()) -> None:
    """Serve the explorer with waitress until interrupted."""
    import logging

    from waitress import serve as waitress_serve

    # a page loads dozens of deep-zoom tiles at once; a short queue is normal, not worth a warning per request
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    extra = tuple(allow_hosts) + ((host,) if host not in ("0.0.0.0", "::") else ())
    waitress_serve(create_app(store, allowed_hosts=extra), host=host, port=port, threads=threads, ident="hefeat")
