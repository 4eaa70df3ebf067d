"""UMAP maps: list, compute (POST), points and the values that colour them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.explore.web import (
    _ID,
    Context,
    _arg,
    _json_body,
    _read_umap,
    encode_values,
)


def blueprint(ctx: Context):
    """The routes of this area, over the context's store and caches."""
    from flask import Blueprint, Response, jsonify, request

    bp = Blueprint(__name__.rsplit(".", 1)[-1], __name__)
    store, cat, a = ctx.store, ctx.cat, ctx.a

    # -- UMAP ----------------------------------------------------------------------------------
    @bp.get("/api/umaps")
    def umaps():
        from hefeat.explore.umap_map import describe, list_umaps

        eid = a("extraction", pattern=_ID)
        cat.extraction(eid)
        return jsonify([{**u, "what": describe(u)} for u in list_umaps(store, eid)])

    @bp.post("/api/umap")
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

    @bp.get("/api/umap/<uid>")
    def umap_meta(uid):
        from hefeat.explore.umap_map import describe

        _arg({"umap": uid}, "umap", pattern=_ID)
        info, rows = umap_rows(uid)
        slides = list(dict.fromkeys(rows["slide_id"]))
        return jsonify({**info, "what": describe(info), "slides": slides,
                        "bounds": [float(rows["umap_x"].min()), float(rows["umap_x"].max()),
                                   float(rows["umap_y"].min()), float(rows["umap_y"].max())]})

    @bp.get("/api/umap/<uid>/points.bin")
    def umap_points(uid):
        """float32 x[n], float32 y[n], int32 slide index[n] (into /api/umap/<id>'s slides), int32 tile_id[n]."""
        _arg({"umap": uid}, "umap", pattern=_ID)
        _, rows = umap_rows(uid)
        codes = pd.Categorical(rows["slide_id"], categories=list(dict.fromkeys(rows["slide_id"]))).codes
        parts = [rows["umap_x"].to_numpy(np.float32), rows["umap_y"].to_numpy(np.float32),
                 codes.astype(np.int32), rows["tile_id"].to_numpy(np.int32)]
        return Response(b"".join(np.ascontiguousarray(p).astype("<" + p.dtype.str[1:]).tobytes() for p in parts),
                        mimetype="application/octet-stream")

    @bp.get("/api/umap/<uid>/values")
    def umap_values(uid):
        from hefeat.explore.values import values_for

        _arg({"umap": uid}, "umap", pattern=_ID)
        info, rows = umap_rows(uid)
        spec = a("value")
        vals, val = values_for(store, spec, rows, tiling_id=info.get("tiling_id") or cat.extraction(
            info["extraction_id"])["tiling_id"])
        return jsonify(encode_values(vals, val))

    return bp
