"""Explorer at cohort scale: time to first paint of an N-point latent map in headless Chromium.

A store is fabricated in the real formats (benchmarks/store_scale.py's `fabricate`: slides, tiles
Parquet, fp16 feature files, status records), a UMAP-shaped 2-D layout of every tile is written with
hefeat's own `write_umap` (computing a real UMAP of 1M tiles takes ~an hour on 2 cores and is not what
is measured), and `hefeat explore`'s app is served by waitress. For each size the page is opened in
Debian's Chromium (software WebGL, SwiftShader, when no GPU is present) and we record:

- first paint: from the start of loading the map (metadata + points.bin) to the first frame drawn;
- page ready: navigation start to everything loaded (extractions, slides, values, map, slide viewer);
- colour by a tiles column over all N points (server join + upload + redraw);
- frames per second the browser completes during a 2 s animated zoom (requestAnimationFrame ticks; each
  one redraws every point).

Run: flock /tmp/hefeat-bench.lock python benchmarks/explorer_paint.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def fabricate_map(root: Path, n_points: int, slides: int, seed: int) -> tuple[object, str, str]:
    """A fabricated store with `n_points` tiles over `slides` slides and a stored 2-D map of all of them."""
    import pandas as pd

    sys.path.insert(0, str(HERE))
    from store_scale import fabricate

    from hefeat.explore.umap_map import write_umap
    from hefeat.store.catalog import Store
    from hefeat.store.ids import content_id, extraction_fingerprint
    from hefeat.store.runs import timestamp

    per = n_points // slides
    info_p = root / "_fabricated.json"
    info = json.loads(info_p.read_text()) if info_p.exists() else None
    if not info or info.get("tiles") != per * slides:
        info = fabricate(root, slides, tiles=(per, per), dim=16, genes=10, seed=seed)
    st = Store(root)
    eid = info["extraction_id"]
    fp = extraction_fingerprint(st, eid)
    uid = content_id({"fabricated": n_points, "seed": seed, "fingerprint": fp}, prefix="u")
    if not st.umap_path(uid).exists():
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(40, 2)) * 6
        slide_of = np.repeat(np.arange(slides), per)
        k = (slide_of * 7 + rng.integers(0, 3, len(slide_of))) % len(centres)
        xy = centres[k] + rng.normal(size=(len(k), 2)) * rng.uniform(0.3, 1.2, len(centres))[k, None]
        rows = pd.DataFrame({"slide_id": [f"S{i:05d}" for i in slide_of], "tile_id": np.tile(np.arange(per), slides),
                             "umap_x": xy[:, 0].astype(np.float32), "umap_y": xy[:, 1].astype(np.float32),
                             "cluster": k.astype(np.int16)})
        write_umap(st, uid, rows, {"umap_id": uid, "extraction_id": eid, "fingerprint": fp, "n": len(rows),
                                   "n_slides": slides, "tiling_id": info["tiling_id"], "encoder": "fabricated",
                                   "sample": None, "created": timestamp(), "fabricated_layout": True})
    return st, eid, uid


def measure(st, uid: str, repeat: int) -> dict:
    """Open the page `repeat` times; medians of first paint, ready, colour-by and zoom frame rate."""
    from playwright.sync_api import sync_playwright
    from waitress.server import create_server

    from hefeat.explore.server import create_app

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    srv = create_server(create_app(st), host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=srv.run, daemon=True).start()
    base = f"http://127.0.0.1:{srv.effective_port}/"
    out = {"first_paint_ms": [], "ready_ms": [], "color_ms": [], "zoom_fps": []}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            for _ in range(repeat):
                pg = b.new_page(viewport={"width": 1400, "height": 1000})
                pg.goto(base, wait_until="domcontentloaded")
                pg.wait_for_function("document.body.dataset.ready && document.getElementById('scatter').dataset.rendered > 0",
                                     timeout=600_000)
                out["first_paint_ms"].append(pg.evaluate("window.__explorer.firstPaintMs"))
                out["ready_ms"].append(float(pg.evaluate("document.body.dataset.ready")))
                t = time.perf_counter()
                pg.select_option("#colorBy", "sharpness")
                pg.wait_for_function("document.getElementById('legend').dataset.kind === 'continuous'", timeout=600_000)
                pg.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                out["color_ms"].append((time.perf_counter() - t) * 1000)
                out["zoom_fps"].append(pg.evaluate("""() => new Promise((resolve) => {
                    const sp = window.__explorer.sp; let frames = 0, run = true; const t0 = performance.now();
                    const tick = () => { frames++; if (run) requestAnimationFrame(tick); };
                    requestAnimationFrame(tick);
                    sp.zoomToLocation([0.2, 0.1], 0.25, { transition: true, transitionDuration: 2000 });
                    setTimeout(() => { run = false; resolve(frames / ((performance.now() - t0) / 1000)); }, 2000); })"""))
                pg.close()
            b.close()
    finally:
        srv.close()
    med = {k: float(np.median(v)) for k, v in out.items()}
    return {**{k: round(v, 1) for k, v in med.items()}, "runs": repeat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--slides", type=int, default=100, help="slides the points are spread over")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/hefeat-explorer-paint")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_before": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(header), flush=True)
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        st, _, uid = fabricate_map(Path(a.workdir) / f"store-{n}", n, a.slides, a.seed)
        r = {"points": n, **measure(st, uid, a.repeat)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    header["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print("\n| points | first paint | page ready | colour by sharpness | zoom animation |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['points']:,} | {r['first_paint_ms'] / 1000:.2f} s | {r['ready_ms'] / 1000:.2f} s | "
              f"{r['color_ms'] / 1000:.2f} s | {r['zoom_fps']:.0f} frames/s |")
    if len(rows) > 1:
        print(f"\nfirst paint ratio {rows[-1]['points']:,} / {rows[0]['points']:,} points: "
              f"{rows[-1]['first_paint_ms'] / rows[0]['first_paint_ms']:.1f}x")
    print(f"load average before {header['load_before']}, after {header['load_after']}")


if __name__ == "__main__":
    main()
