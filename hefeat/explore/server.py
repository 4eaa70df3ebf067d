"""`hefeat explore`: a small local web app over the store (Flask), bound to 127.0.0.1 by default.

It serves one static page and JSON/PNG endpoints computed from the store; files are only ever served
from inside the store directory (Flask's safe_join refuses traversal).
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def create_app(store: Store):
    """The Flask app for a store."""
    from flask import Flask, Response, abort, jsonify, request, send_from_directory

    from hefeat.explore.neighbors import build_index, query
    from hefeat.explore.tiles import tile_image
    from hefeat.explore.umap_map import run_umap

    app = Flask(__name__)
    page = resources.files("hefeat.explore").joinpath("static/index.html").read_text()

    @app.errorhandler(HefeatError)
    def _err(e):
        return jsonify({"error": str(e)}), 400

    @app.get("/")
    def index():
        return Response(page, mimetype="text/html")

    @app.get("/api/extractions")
    def extractions():
        df = store.sql("SELECT extraction_id, tiling_id, encoder, dim FROM extractions ORDER BY created")
        return jsonify(df.to_dict("records"))

    @app.get("/api/umap")
    def umap_points():
        eid = request.args["extraction"]
        u = run_umap(store, eid, sample=int(request.args.get("sample", 5000)), pca=50)
        df = store.sql("SELECT slide_id, tile_id, umap_x, umap_y FROM umap WHERE umap_id = ?", [u["umap_id"]])
        return jsonify({"umap_id": u["umap_id"], "points": df.to_dict("records")})

    @app.get("/api/neighbors")
    def neighbors():
        eid = request.args["extraction"]
        sid, tid = request.args["slide"], int(request.args["tile"])
        build_index(store, eid)
        res = query(store, extraction_id=eid, tile=(sid, tid), k=int(request.args.get("k", 12)),
                    exclude_same_slide=request.args.get("other_slides") == "1")
        cols = ["rank", "slide_id", "tile_id", "distance", "patient_id"]
        return jsonify(res[cols].to_dict("records"))

    @app.get("/api/tile/<extraction>/<slide>/<int:tile>.png")
    def tile_png(extraction, slide, tile):
        return Response(_png(tile_image(store, slide, tile, extraction_id=extraction)), mimetype="image/png")

    @app.get("/api/slides")
    def slides():
        return jsonify(store.sql("SELECT slide_id, patient_id, site FROM slides ORDER BY 1").to_dict("records"))

    @app.get("/api/heatmap/<extraction>/<slide>.png")
    def heatmap_png(extraction, slide):
        from hefeat.explore.heatmap import render_heatmap

        col = request.args.get("column", "sharpness")
        if col not in ("tissue_frac", "sharpness", "mean_r", "mean_g", "mean_b", "background_frac", "density"):
            abort(400)
        tid = store.extraction(extraction)["tiling_id"]
        buf = io.BytesIO()
        store.slides([slide])  # unknown slide -> clear error
        render_heatmap(store, slide, f"SELECT tile_id, {col} FROM tiles WHERE tiling_id = '{tid}' "
                       f"AND slide_id = '{slide}'", buf, tiling_id=tid)
        return Response(buf.getvalue(), mimetype="image/png")

    @app.get("/files/<path:path>")
    def files(path):
        # Only the store's own files; safe_join (inside send_from_directory) refuses '..' and absolute paths.
        return send_from_directory(store.root, path)

    return app


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the explorer until interrupted."""
    create_app(store).run(host=host, port=port, debug=False, use_reloader=False, threaded=True)
