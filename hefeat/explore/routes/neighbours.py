"""Neighbour search: the indexes of an extraction, building one (POST), a tile's nearest tiles."""

from __future__ import annotations

import json

from hefeat.explore.web import (
    _ID,
    Context,
    _arg,
    _json_body,
)


def blueprint(ctx: Context):
    """The routes of this area, over the context's store and caches."""
    from flask import Blueprint, jsonify, request

    bp = Blueprint(__name__.rsplit(".", 1)[-1], __name__)
    store, cat, a, tile_of = ctx.store, ctx.cat, ctx.a, ctx.tile_of

    # -- neighbours ----------------------------------------------------------------------------
    @bp.get("/api/indexes")
    def indexes():
        eid = a("extraction", pattern=_ID)
        df = store.sql("SELECT * FROM indexes WHERE extraction_id = ? ORDER BY created DESC", [eid])
        return jsonify(json.loads(df.to_json(orient="records")))

    @bp.post("/api/index")
    def index_build():
        from hefeat.explore.neighbors import INDEX_TYPES, build_index

        body = _json_body(request)
        eid = _arg(body, "extraction", pattern=_ID)
        cat.extraction(eid)
        return jsonify(build_index(store, eid, index=_arg(body, "index", default="auto", choices=INDEX_TYPES)))

    @bp.get("/api/neighbors")
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

    return bp
