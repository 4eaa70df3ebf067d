"""Extraction throughput in one run: bare encoder per precision, hefeat end to end with `auto`, a CLAM-style baseline.

For each encoder (default: ResNet-50 up to layer3, 1024-d, and the full ResNet-50, 2048-d; random
weights: speed does not depend on them):
- bare: the encoder alone on pre-decoded tiles already in memory (device transform included), for
  every precision the device can run and both memory formats; the best per precision is reported;
- hefeat: `run_extraction(precision="auto")` over >= 1,000 tiles of a synthetic cohort through the
  real store (read + decode, transform, forward, write), with an empty
  calibration cache, so the run pays its calibration; tiles/s of the extraction loop, and with the
  calibration and model build included;
- baseline: what CLAM's extract_features_fp does, serially in one process: read a tile (OpenSlide),
  PIL -> ToTensor -> Normalize, stack a batch, fp32 forward (NCHW), append to a list.
Ratios printed: hefeat / fastest bare precision, hefeat / baseline.
Run: python benchmarks/extract.py [--encoders resnet50:layer3,resnet50] [--tiles 1024] [--baseline-tiles 512]
     python benchmarks/extract.py --memory      # peak RSS for a 5,000- vs a 50,000-tile slide
     python benchmarks/extract.py --decode-once --encoders resnet18:layer1   # tile then extract vs one read
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
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store

    make_cohort(d / "c", n_slides=n_slides, n_genes=20, seed=3, width_um=width, height_um=height)
    st = Store.init(d / "st")
    ingest_slides(st, sorted(glob.glob(str(d / "c" / "slides" / "*.tiff"))))
    tid = run_tiling(st, TilingParams(stride=stride, max_tiles=max_tiles, tissue_threshold=0.25)).extra["tiling_id"]
    return st, tid


def bare_rates(encoder: str, layer: str | None, batch: int, imgs: np.ndarray, seconds: float) -> dict:
    """Tiles/s of the encoder alone per precision and memory format (all batches of `seconds` of work)."""
    import torch

    from hefeat.extract.compute import DeviceTransform, embed_batch
    from hefeat.extract.encoders import create_encoder
    from hefeat.extract.precision import candidates, device_capabilities

    enc = create_encoder(encoder, weights="none", layer=layer)
    caps = device_capabilities("cpu")
    cands, excluded = candidates(caps)
    x = torch.from_numpy(imgs)
    out: dict = {"excluded": excluded}
    for c in cands:
        tr = DeviceTransform(enc.config, "cpu", channels_last=c.channels_last)
        enc.to(memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
        embed_batch(enc, tr, x[:batch], device="cpu", precision=c.precision)  # warm-up
        n, t0, i = 0, time.perf_counter(), 0
        while time.perf_counter() < t0 + seconds:
            b = x[(i * batch) % len(x):(i * batch) % len(x) + batch]
            embed_batch(enc, tr, b, device="cpu", precision=c.precision).cpu().numpy()
            n, i = n + len(b), i + 1
        out[c.label] = round(n / (time.perf_counter() - t0), 2)
    per = {}
    for label, rate in out.items():
        if label != "excluded":
            p = label.split("/")[0]
            per[p] = max(per.get(p, 0.0), rate)
    out["best_per_precision"] = per
    return out


def clam_baseline(paths_xy: list[tuple[str, int, int]], encoder: str, layer: str | None, batch: int) -> float:
    """Tiles/s of a CLAM-style serial loop: OpenSlide read -> PIL -> ToTensor/Normalize -> fp32 forward."""
    import openslide
    import torch
    from torchvision import transforms

    from hefeat.extract.encoders import create_encoder

    enc = create_encoder(encoder, weights="none", layer=layer)
    enc.to(memory_format=torch.contiguous_format)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(enc.config.mean, enc.config.std)])
    feats, opened = [], {}
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths_xy), batch):
            ims = []
            for path, x, y in paths_xy[i:i + batch]:
                s = opened.get(path) or opened.setdefault(path, openslide.OpenSlide(path))
                ims.append(tf(s.read_region((x, y), 0, (224, 224)).convert("RGB")))
            feats.append(enc(torch.stack(ims)).numpy())
    rate = len(paths_xy) / (time.perf_counter() - t)
    for s in opened.values():
        s.close()
    return rate


def throughput(a) -> None:
    import torch

    from hefeat.extract.pipeline import ExtractOptions, run_extraction
    from hefeat.extract.precision import device_capabilities
    from hefeat.slides.reader import Slide

    load0 = os.getloadavg()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{device_capabilities('cpu')['name']}, "
                 f"{platform.machine()}", "torch": torch.__version__, "load_before": [round(v, 2) for v in load0]}
    with tempfile.TemporaryDirectory() as d:
        # 0.5 µm/px slides tiled with a half-tile stride: >= 1,000 tiles from 4 slides.
        st, tid = _cohort(Path(d), 4, 1600, 1200, stride=112, max_tiles=-(-a.tiles // 4))
        tiles = st.sql("SELECT t.slide_id, x, y, s.path FROM tiles t JOIN slides s USING (slide_id) "
                       "WHERE tiling_id = ? ORDER BY t.slide_id, tile_id", [tid])
        res["tiles"] = len(tiles)
        imgs = []
        for path, g in tiles.groupby("path", sort=True):
            with Slide(path) as s:
                imgs += [s.read(x, y, 224, 0.5) for x, y in g[["x", "y"]].to_numpy()]
        imgs = np.stack(imgs[: a.bare_tiles])
        base_items = [(p, int(x), int(y)) for p, x, y in tiles[["path", "x", "y"]].to_numpy()[: a.baseline_tiles]]
        for spec in a.encoders.split(","):
            name, _, layer = spec.partition(":")
            layer = layer or None
            r: dict = {}
            r["bare"] = bare_rates(name, layer, a.batch, imgs, a.bare_seconds)
            best_p, best = max(r["bare"]["best_per_precision"].items(), key=lambda kv: kv[1])
            os.environ["HEFEAT_CACHE_DIR"] = str(Path(d) / f"cache-{spec}")  # empty: this run calibrates
            t0 = time.perf_counter()
            s = run_extraction(st, tiling_id=tid, encoder=name, weights="none", layer=layer, precision="auto",
                               options=ExtractOptions(batch_size=a.batch, workers=a.workers))
            wall = time.perf_counter() - t0
            tm = s.extra["timings"]
            e2e = s.tiles / tm["loop_s"]
            r["hefeat_auto"] = {"chose": s.extra["precision"], "channels_last": s.extra["precision_choice"]["channels_last"],
                                "reason": s.extra["precision_choice"]["reason"], "tiles": s.tiles,
                                "tiles_per_s": round(e2e, 2), "tiles_per_s_incl_calibration_and_build": round(s.tiles / wall, 2),
                                "timings": tm}
            base = clam_baseline(base_items, name, layer, a.batch)
            r["baseline_clam_fp32_tiles_per_s"] = round(base, 2)
            r["ratio_auto_over_fastest_bare"] = round(e2e / best, 3)
            r["fastest_bare"] = f"{best_p} {best:.2f} tiles/s"
            r["ratio_auto_over_baseline"] = round(e2e / base, 3)
            res[spec] = r
            print(json.dumps({spec: r}), flush=True)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=1))


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


DECODE_ONCE_CHILD = """
import json, sys, time, os
os.environ["HF_HUB_OFFLINE"] = "1"
from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
st, mode, name, layer, batch, workers = Store(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] or None, int(sys.argv[5]), sys.argv[6]
params = TilingParams(tissue_threshold=0.25)
opt = ExtractOptions(batch_size=batch, workers=int(workers) if workers else None)
enc = dict(encoder=name, weights="none", layer=layer, precision="bf16")
t0 = time.perf_counter()
if mode == "two-step":
    t = run_tiling(st, params)
    t1 = time.perf_counter()
    s = run_extraction(st, tiling_id=t.extra["tiling_id"], options=opt, **enc)
    out = {"tiling_s": round(t1 - t0, 3), "extract_s": round(time.perf_counter() - t1, 3)}
else:
    s = run_extraction(st, tile_params=params, options=opt, **enc)
    out = {"decode_once": s.extra["decode_once"]}
out.update(wall_s=round(time.perf_counter() - t0, 3), tiles=s.tiles, extraction_id=s.extra["extraction_id"])
print(json.dumps(out))
"""


def decode_once(a) -> None:
    """Tile then extract (each tile decoded twice) vs `extract --tile` (once), same cohort, fresh stores, alternated."""
    import shutil

    from hefeat.slides.run import ingest_slides
    from hefeat.slides.synth import make_cohort
    from hefeat.store.catalog import Store

    name, _, layer = a.encoders.split(",")[0].partition(":")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "encoder": a.encoders.split(",")[0],
                 "load_before": [round(v, 2) for v in os.getloadavg()], "runs": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_cohort(d / "c", n_slides=4, n_genes=20, seed=3, width_um=3200, height_um=2400)
        ingest_slides(Store.init(d / "template"), sorted(glob.glob(str(d / "c" / "slides" / "*.tiff"))))
        for rep in range(a.repeat):
            for mode in (("two-step", "decode-once") if rep % 2 == 0 else ("decode-once", "two-step")):
                root = d / f"{mode}-{rep}"
                shutil.copytree(d / "template", root)
                p = subprocess.run([sys.executable, "-c", DECODE_ONCE_CHILD, str(root), mode, name, layer, str(a.batch),
                                    str(a.workers or "")], capture_output=True, text=True, check=True)
                r = {"mode": mode, **json.loads(p.stdout.strip().splitlines()[-1])}
                res["runs"].append(r)
                print(json.dumps(r), flush=True)
                shutil.rmtree(root)
    best = {m: min(r["wall_s"] for r in res["runs"] if r["mode"] == m) for m in ("two-step", "decode-once")}
    assert len({r["extraction_id"] for r in res["runs"]}) == 1, "both paths must give the same extraction"
    res["best_wall_s"] = best
    res["ratio_two_step_over_decode_once"] = round(best["two-step"] / best["decode-once"], 3)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="resnet50:layer3,resnet50", help="name[:layer],... (timm names)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--tiles", type=int, default=1024, help="end-to-end tiles (>= 1,000 for the goal)")
    ap.add_argument("--bare-tiles", type=int, default=256, help="pre-decoded tiles cycled through for bare rates")
    ap.add_argument("--bare-seconds", type=float, default=15.0, help="seconds of work per bare candidate")
    ap.add_argument("--baseline-tiles", type=int, default=512, help="tiles through the CLAM-style loop")
    ap.add_argument("--memory", action="store_true", help="Only measure peak RSS for 5k vs 50k tiles.")
    ap.add_argument("--decode-once", action="store_true",
                    help="Only compare tile-then-extract with extract --tile (one read per tile), first encoder.")
    ap.add_argument("--repeat", type=int, default=2, help="--decode-once: runs of each path (order alternated)")
    a = ap.parse_args()
    if a.memory:
        memory(a)
    elif a.decode_once:
        decode_once(a)
    else:
        throughput(a)


if __name__ == "__main__":
    main()
