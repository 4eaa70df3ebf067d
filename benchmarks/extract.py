"""Extraction throughput: our pipeline vs the bare encoder, in one run; and memory vs slide size.

End-to-end tiles/s (read + decode + transform + forward + write) divided by bare-encoder tiles/s
(the same encoder, precision and batch fed pre-decoded uint8 tensors already in memory).
Run: python benchmarks/extract.py [--encoder resnet50] [--precision bf16] [--tiles 512] [--memory]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cohort(d: Path, n_slides: int, width: float, height: float, stride: int | None = None, max_tiles=None):
    from hefeat.slides.run import run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_slides

    make_cohort(d / "c", n_slides=n_slides, n_genes=20, seed=3, width_um=width, height_um=height)
    st = Store.init(d / "st")
    ingest_slides(st, sorted(glob.glob(str(d / "c" / "slides" / "*.tiff"))))
    tid = run_tiling(st, TilingParams(stride=stride, max_tiles=max_tiles, tissue_threshold=0.25)).extra["tiling_id"]
    return st, tid


def bare_rate(encoder, layer, precision, batch, imgs) -> float:
    """Tiles/s of the encoder alone on pre-decoded uint8 tiles (device transform included)."""
    import torch

    from hefeat.extract.encoders import create_encoder
    from hefeat.extract.pipeline import DeviceTransform, embed_batch

    enc = create_encoder(encoder, weights="none", layer=layer)
    enc.net.to(memory_format=torch.channels_last)
    tr = DeviceTransform(enc.config, "cpu")
    x = torch.from_numpy(imgs)
    embed_batch(enc, tr, x[:batch], device="cpu", precision=precision)  # warm-up
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        embed_batch(enc, tr, x[i:i + batch], device="cpu", precision=precision).cpu().numpy()
    return len(x) / (time.perf_counter() - t)


def throughput(a) -> None:
    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.slides.reader import Slide

    with tempfile.TemporaryDirectory() as d:
        st, tid = _cohort(Path(d), 4, 1600, 1200, max_tiles=a.tiles // 4)
        tiles = st.sql(f"SELECT t.slide_id, x, y, s.path FROM tiles t JOIN slides s USING (slide_id) WHERE tiling_id = '{tid}'")
        imgs = []
        for path, g in tiles.groupby("path"):
            with Slide(path) as s:
                imgs += [s.read(x, y, 224, 0.5) for x, y in g[["x", "y"]].to_numpy()]
        imgs = np.stack(imgs)
        # Warm the code path (imports, first-batch allocation) before timing either side.
        bare = bare_rate(a.encoder, a.layer, a.precision, a.batch, imgs)
        s = run_extraction(st, tiling_id=tid, encoder=a.encoder, weights="none", layer=a.layer, precision=a.precision,
                           options=ExtractOptions(batch_size=a.batch, workers=a.workers))
        tm = s.extra["timings"]
        e2e_loop = s.tiles / tm["loop_s"]
        e2e_all = s.tiles / s.seconds
        fp32 = bare_rate(a.encoder, a.layer, "fp32", a.batch, imgs[: max(a.batch * 2, 64)]) if a.precision != "fp32" else bare
    out = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "encoder": a.encoder, "layer": a.layer,
           "precision": a.precision, "batch": a.batch, "tiles": s.tiles, "bare_tiles_per_s": round(bare, 2),
           "e2e_tiles_per_s": round(e2e_loop, 2), "e2e_incl_model_build_tiles_per_s": round(e2e_all, 2),
           "ratio_e2e_over_bare": round(e2e_loop / bare, 3), "ratio_incl_model_build": round(e2e_all / bare, 3),
           "bare_fp32_tiles_per_s": round(fp32, 2), "timings": tm}
    print(json.dumps(out, indent=1))


MEM_CHILD = """
import json, resource, sys, os
os.environ["HF_HUB_OFFLINE"] = "1"
from hefeat.store.catalog import Store
from hefeat.extract.pipeline import ExtractOptions, run_extraction
st = Store(sys.argv[1])
s = run_extraction(st, tiling_id=sys.argv[2], encoder="resnet18", weights="none", layer="layer1", precision="bf16",
                   options=ExtractOptions(batch_size=64, workers=1))
print(json.dumps({"tiles": s.tiles, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tiles_per_s": s.tiles_per_s}))
"""


def memory(a) -> None:
    """Peak RSS of the extracting process for a 5,000-tile and a 50,000-tile slide."""
    with tempfile.TemporaryDirectory() as d:
        st, tid_big = _cohort(Path(d), 1, 3400, 2600, stride=16, max_tiles=50_000)
        from hefeat.slides.run import run_tiling
        from hefeat.slides.tiling import TilingParams

        tid_small = run_tiling(st, TilingParams(stride=16, max_tiles=5_000, tissue_threshold=0.25)).extra["tiling_id"]
        res = {}
        for name, tid in (("small", tid_small), ("big", tid_big)):
            p = subprocess.run([sys.executable, "-c", MEM_CHILD, str(st.root), tid], capture_output=True, text=True, check=True)
            res[name] = json.loads(p.stdout.strip().splitlines()[-1])
    res["rss_ratio_big_over_small"] = round(res["big"]["maxrss_mb"] / res["small"]["maxrss_mb"], 3)
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="resnet50")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--memory", action="store_true", help="Also measure peak RSS for 5k vs 50k tiles.")
    a = ap.parse_args()
    throughput(a)
    if a.memory:
        memory(a)


if __name__ == "__main__":
    main()
