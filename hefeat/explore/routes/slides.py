"""Slides: deep-zoom pyramid tiles, slide info, tile geometry, value overlays, tile images and details."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from hefeat.explore.web import (
    _ID,
    Context,
    _arg,
    _b64,
    _clinical,
    _cohort_span,
    _slide,
    encode_values,
)


def blueprint(ctx: Context):
    """The routes of this area, over the context's store and caches."""
    from flask import Blueprint, Response, jsonify

    bp = Blueprint(__name__.rsplit(".", 1)[-1], __name__)
    store, cat, dz, a, tiling_of, tile_of = ctx.store, ctx.cat, ctx.dz, ctx.a, ctx.tiling_of, ctx.tile_of

    # -- slides: deep zoom and overlays --------------------------------------------------------
    @bp.get("/dz/<slide>.dzi")
    def dzi(slide):
        row = cat.slide(slide)
        return Response(dz.dzi(row["path"]), mimetype="application/xml")

    @bp.get("/dz/<slide>_files/<level>/<tile>.jpeg")
    def dz_tile(slide, level, tile):
        row = cat.slide(slide)
        lv = _arg({"level": level}, "level", int, lo=0, hi=64)
        c, _, r = tile.partition("_")
        col, rw = _arg({"col": c}, "col", int, lo=0), _arg({"row": r}, "row", int, lo=0)
        resp = Response(dz.tile(row["path"], lv, col, rw), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    @bp.get("/api/slide/<slide>")
    def slide_info(slide):
        row = cat.slide(slide)
        b = dz.bounds(row["path"])
        tilings = [t for t in store.sql("SELECT tiling_id FROM tilings")["tiling_id"] if store.tiles_path(t, slide).exists()]
        return jsonify({"slide_id": slide, "patient_id": row["patient_id"], "site": row["site"],
                        "mpp": float(row["mpp_x"]), "bounds": b, "tilings": tilings})

    @bp.get("/api/tiles")
    def tiles_geometry():
        sid = a("slide", pattern=_ID)
        cat.slide(sid)
        tid = tiling_of(a("extraction", default="", pattern=_ID + "|"), a("tiling", default="", pattern=_ID + "|"))
        t = cat.tiles(tid, sid)
        return jsonify({"slide_id": sid, "tiling_id": tid, "tiles": len(t), "x": _b64(t["x"].to_numpy(np.float32)),
                        "y": _b64(t["y"].to_numpy(np.float32)), "size0": _b64(t["size0"].to_numpy(np.float32)),
                        "tile_id": _b64(t["tile_id"].to_numpy(np.int32))})

    @bp.get("/api/overlay")
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
    @bp.get("/api/tile/<eid>/<slide>/<tile>.png")
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

    @bp.get("/api/tile/<eid>/<slide>/<tile>")
    def tile_json(eid, slide, tile):
        from hefeat.explore.values import clinical_columns

        e, t = tile_of(eid, slide, tile)
        row = cat.slide(slide)
        info = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in t.items()}
        info.update(slide_id=slide, patient_id=row["patient_id"], site=row["site"], tiling_id=e["tiling_id"])
        if clinical_columns(store):
            info["clinical"] = _clinical(store, cat).get(slide, {})
        return jsonify(info)

    return bp
