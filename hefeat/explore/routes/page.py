"""The explorer's page and its lists: extractions, slides, the values that can colour tiles."""

from __future__ import annotations

import json

from hefeat.explore.web import (
    _ID,
    Context,
)


def blueprint(ctx: Context):
    """The routes of this area, over the context's store and caches."""
    from flask import Blueprint, Response, jsonify

    bp = Blueprint(__name__.rsplit(".", 1)[-1], __name__)
    store, cat, a, tiling_of = ctx.store, ctx.cat, ctx.a, ctx.tiling_of

    # -- page and lists ------------------------------------------------------------------------
    @bp.get("/")
    def index():
        return Response(ctx.page, mimetype="text/html")

    @bp.get("/api/extractions")
    def extractions():
        e = cat.extractions()
        n = store.sql("SELECT extraction_id, count(*) AS slides, sum(n_tiles) AS tiles FROM features_index GROUP BY 1")
        e = e.reset_index(drop=True).merge(n, on="extraction_id", how="left")
        cols = [c for c in ("extraction_id", "tiling_id", "encoder", "layer", "dim", "slides", "tiles") if c in e]
        return jsonify(json.loads(e[cols].to_json(orient="records")))

    @bp.get("/api/slides")
    def slides():
        s = cat.slides().reset_index(drop=True)
        return jsonify(json.loads(s[["slide_id", "patient_id", "site", "width", "height", "mpp_x"]].to_json(orient="records")))

    @bp.get("/api/values")
    def values():
        from hefeat.explore.values import value_options

        tid = tiling_of(a("extraction", default="", pattern=_ID + "|"), a("tiling", default="", pattern=_ID + "|"))
        uid = a("umap", default="", pattern=_ID + "|") or None
        return jsonify(value_options(store, tid, umap_id=uid))

    return bp
