"""`hefeat explore`: a local, read-only web app over a store, served by waitress.

Safety rules (each has a test):
- bound to 127.0.0.1 by default; every request's Host header must name an allowed host, so a
  DNS-rebinding page cannot talk to it; POSTs must be JSON from an allowed origin;
- GET never writes: computing a UMAP or a neighbour index is an explicit POST (or CLI step);
- no file route: only deep-zoom tiles of catalogued slides, images of catalogued tiles and the
  package's own static files are served; the catalog and the store's files are unreachable;
- every parameter is validated; errors are JSON with status 400 (never an HTML page);
- SQL typed on the page runs through the store's read-only sandbox.

This module builds the app (host check, error handlers, headers) and serves it; the routes are
Flask blueprints by area in hefeat/explore/routes/ (page, maps, slides, neighbours), sharing
hefeat/explore/web.py (parameter validation, read-side caches, value encoding).
"""

from __future__ import annotations

import json
from importlib import resources

from hefeat.errors import HefeatError
from hefeat.explore.web import _ID, BadRequest, Catalog, Context, _arg, encode_values  # noqa: F401  (re-exported)
from hefeat.store.catalog import Store

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def create_app(store: Store, *, allowed_hosts: tuple[str, ...] = ()):
    """The WSGI app for a store (Flask routes behind the Host check)."""
    from flask import Flask, jsonify
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

    from hefeat.explore.routes import maps, neighbours, slides
    from hefeat.explore.routes import page as page_routes

    ctx = Context(store, cat, dz, page)
    for area in (page_routes, maps, slides, neighbours):
        app.register_blueprint(area.blueprint(ctx))
    return HostCheck(app, set(LOCAL_HOSTS) | set(allowed_hosts))


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8765, threads: int = 4,
          allow_hosts: tuple[str, ...] = ()) -> None:
    """Serve the explorer with waitress until interrupted."""
    import logging

    from waitress import serve as waitress_serve

    # a page loads dozens of deep-zoom tiles at once; a short queue is normal, not worth a warning per request
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    extra = tuple(allow_hosts) + ((host,) if host not in ("0.0.0.0", "::") else ())
    waitress_serve(create_app(store, allowed_hosts=extra), host=host, port=port, threads=threads, ident="hefeat")
