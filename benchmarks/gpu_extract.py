"""GPU extraction in one short command: hefeat end to end (JPEG decode on the device) against the bare encoder.

On a synthetic cohort of JPEG-tiled pyramidal TIFFs (the layout of SVS files), in one process:
- bare: the encoder alone at the precision and memory format `auto` chose, on uint8 tiles already on
  the device (device transform included), the same batch size: the ceiling;
- hefeat: `run_extraction(precision="auto", decode=...)` through the store: tiles read and JPEG-decoded
  on the device (`--decode device`, the default on CUDA), transform, forward, finiteness check, copy
  back, fp16 feature files written by the background writer; tiles/s of the extraction loop, and of
  the whole call with a cold calibration cache and again (a second tiling) with the cache warm.
Ratios printed: hefeat loop / bare, whole call / bare. Goal (issue 22): >= 5,000 tiles/s for
ResNet-50 at 224 px on one GPU.
Correctness: the stored features of the first 64 tiles against the same encoder (same seeded weights,
unfused, fp32 on the CPU: no TF32) on OpenSlide's pixels of those tiles: relative error ||a - b|| / ||b||
(bf16 lands near 1e-2; the device JPEG decoder differs from libjpeg by about a grey level).
--cpu-decode also runs the extraction once more with CPU decoding in DataLoader workers (a third tiling).

GPU (about 2-4 min on an H100/H200):  python benchmarks/gpu_extract.py
CPU check at tiny size (about 1 min): python benchmarks/gpu_extract.py --tiles 96 --encoder resnet18:layer1 --batch 32
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cohort(d: Path, tiles: int, seed: int):
    """A store with slides of 0.5 µm/px JPEG-tiled TIFFs, tiled at 224 px with stride 112: >= `tiles` tiles."""
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store

    # One 4,000 x 3,000 µm slide at stride 112 px (56 µm) holds about 3,000 tissue tiles.
    n_slides = max(1, -(-tiles // 2500))
    make_cohort(d / "c", n_slides=n_slides, n_genes=20, seed=seed, width_um=4000, height_um=3000)
    st = Store.init(d / "st")
    ingest_slides(st, sorted(glob.glob(str(d / "c" / "slides" / "*.tiff"))))
    tid = run_tiling(st, TilingParams(stride=112, max_tiles=-(-tiles // n_slides), tissue_threshold=0.25)
                     ).extra["tiling_id"]
    return st, tid


def _encoder(encoder: str, layer: str | None, device: str, channels_last: bool = False):
    """(encoder, device transform) for the seeded random-weight network on `device`, in the given memory format."""
    import torch

    from hefeat.extract.compute import DeviceTransform
    from hefeat.extract.encoders import create_encoder

    enc = create_encoder(encoder, weights="none", layer=layer)
    enc.to(device)
    enc.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    tf = DeviceTransform(enc.config, device)
    tf.channels_last = channels_last
    return enc, tf


def _bare(encoder: str, layer: str | None, imgs, *, device: str, precision: str, channels_last: bool, batch: int,
          seconds: float) -> float:
    """Tiles/s of the encoder alone on uint8 NHWC tiles already on the device (transform included)."""
    import torch

    from hefeat.extract.compute import embed_batch

    enc, tf = _encoder(encoder, layer, device, channels_last)
    x = torch.from_numpy(imgs).to(device)
    reps = -(-batch // len(x))
    x = torch.cat([x] * reps)[:batch]

    def step():
        f = embed_batch(enc, tf, x, device=device, precision=precision)
        return f.cpu()  # the loop copies features back too

    for _ in range(3):  # warm-up (cudnn autotune, allocator)
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def _reference_error(st, eid: str, tid: str, encoder: str, layer: str | None, device: str, n: int = 64) -> float:
    """||stored - fp32 reference|| / ||reference|| over the first `n` tiles of the first slide."""
    import torch

    from hefeat.extract.compute import embed_batch
    from hefeat.slides.reader import Slide
    from hefeat.store.features import read_features

    sid = st.slides()["slide_id"].iloc[0]
    tiles = st.tiles(tid, sid).head(n)
    with Slide(st.slides().set_index("slide_id").loc[sid, "path"]) as sl:
        imgs = np.stack([sl.read(x, y, 224, 0.5) for x, y in tiles[["x", "y"]].to_numpy()])
    enc, tf = _encoder(encoder, layer, device)
    with torch.no_grad():
        ref = embed_batch(enc, tf, torch.from_numpy(imgs).to(device), device=device,
                          precision="fp32").float().cpu().numpy()
    got = read_features(st.features_path(eid, sid), tiles["tile_id"].to_numpy())
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _decode_breakdown(path: str, device: str, batch: int, stride: int = 112) -> dict:
    """ms per batch of `batch` 224-px regions at `stride` of one slide: JPEG bytes read + streams built (CPU),
    decode (synchronised), regions cut from the decoded tiles (synchronised); JPEG tiles decoded per batch."""
    import torch

    from hefeat.slides import jpeg_tiles as J

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with J.JpegTiles(path) as src:
        lv = src.levels[0]
        regions = [(x, y, 224) for y in range(0, lv.height - 224, stride)
                   for x in range(0, lv.width - 224, stride)][:batch]
        need = sorted({i for x, y, n in regions for i in src.covering(lv, x, y, n, n)})
        out = {"regions": len(regions), "jpeg_tiles": len(need)}
        for _ in range(2):  # the second pass is the one reported (the first loads the decoder)
            sync()
            t0 = time.perf_counter()
            streams = [src.stream(lv, i) for i in need]
            t1 = time.perf_counter()
            J.decode(streams, device, lv.rgb)
            sync()
            t2 = time.perf_counter()
            J.read_regions(src, lv, regions, 224, device)
            sync()
            t3 = time.perf_counter()
        out.update(streams_ms=round(1e3 * (t1 - t0), 2), decode_ms=round(1e3 * (t2 - t1), 2),
                   read_regions_ms=round(1e3 * (t3 - t2), 2),
                   cut_ms_estimate=round(1e3 * ((t3 - t2) - (t2 - t0)), 2))
    return out


def _profiled(st, tiling_id: str, encoder: str, layer: str | None, opt, out: Path) -> dict:
    """One more extraction (cached calibration) under torch.profiler: where the loop's time goes, per op and per
    thread, on the device and on the host; the op tables go to `out` (the profiler slows the run: shares only)."""
    from torch.profiler import ProfilerActivity, profile

    from hefeat.extract.pipeline import run_extraction

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opt.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        s = run_extraction(st, tiling_id=tiling_id, encoder=encoder, weights="none", layer=layer, precision="auto",
                           options=opt)
    ka = prof.key_averages()
    tables = []
    for key in ("self_device_time_total", "self_cuda_time_total"):  # torch versions name the device column apart
        try:
            tables.append(f"== by {key}\n" + ka.table(sort_by=key, row_limit=40))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    tables.append("== by self_cpu_time_total\n" + ka.table(sort_by="self_cpu_time_total", row_limit=40))
    out.write_text("\n\n".join(tables))
    tm = s.extra["timings"]
    return {"tiles": s.tiles, "loop_tiles_per_s": round(s.tiles / tm["loop_s"], 1), "timings": tm,
            "tables": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="resnet50", help="name[:layer] (timm), random weights")
    ap.add_argument("--tiles", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--decode", default="auto", choices=("auto", "device", "cpu"))
    ap.add_argument("--bare-seconds", type=float, default=10.0)
    ap.add_argument("--cpu-decode", action="store_true", help="also a run decoding on the CPU (DataLoader workers)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also a run under torch.profiler (CPU + CUDA), its op tables written to this file")
    a = ap.parse_args()
    import torch

    from hefeat.extract.pipeline import ExtractOptions, resolve_device, run_extraction
    from hefeat.extract.precision import device_capabilities
    from hefeat.slides.reader import Slide

    device = resolve_device(None)
    name, _, layer = a.encoder.partition(":")
    layer = layer or None
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
                 "machine": (torch.cuda.get_device_name(0) if device == "cuda" else device_capabilities("cpu")["name"])
                 + f", {platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                 "load_before": [round(v, 2) for v in os.getloadavg()], "encoder": a.encoder, "batch": a.batch}
    marks = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        st, tid = _cohort(d, a.tiles, seed=5)
        marks["cohort_and_tiling_s"] = round(time.perf_counter() - t_start, 1)
        os.environ["HEFEAT_CACHE_DIR"] = str(d / "cache")  # empty: the first run calibrates
        opt = ExtractOptions(batch_size=a.batch, workers=a.workers, device=device, decode=a.decode)
        t0 = time.perf_counter()
        s = run_extraction(st, tiling_id=tid, encoder=name, weights="none", layer=layer, precision="auto", options=opt)
        wall = time.perf_counter() - t0
        tm = s.extra["timings"]
        prec, cl = s.extra["precision"], bool(s.extra["precision_choice"]["channels_last"])
        loop = s.tiles / tm["loop_s"]
        res["hefeat"] = {"tiles": s.tiles, "precision": prec, "channels_last": cl, "decode": s.extra.get("decode"),
                         "loop_tiles_per_s": round(loop, 1), "call_tiles_per_s": round(s.tiles / wall, 1),
                         "timings": tm, "precision_reason": s.extra["precision_choice"].get("reason")}
        marks["first_extraction_s"] = round(wall, 1)
        res["hefeat"]["rel_error_vs_fp32_reference"] = round(
            _reference_error(st, s.extra["extraction_id"], tid, name, layer, "cpu"), 5)
        # Warm cache: the same tiles under a second tiling id (stride changes the id, not the pixels' cost).
        from hefeat.slides.run import run_tiling
        from hefeat.slides.tiling import TilingParams

        tid2 = run_tiling(st, TilingParams(stride=113, max_tiles=s.tiles // max(1, len(st.slides())),
                                           tissue_threshold=0.25)).extra["tiling_id"]
        t0 = time.perf_counter()
        s2 = run_extraction(st, tiling_id=tid2, encoder=name, weights="none", layer=layer, precision="auto",
                            options=opt)
        wall2 = time.perf_counter() - t0
        res["hefeat_cached_calibration"] = {"tiles": s2.tiles, "source": s2.extra["precision_choice"]["source"],
                                            "calibrate_s": s2.extra["timings"]["calibrate_s"],
                                            "call_tiles_per_s": round(s2.tiles / wall2, 1)}
        if a.cpu_decode:
            tid3 = run_tiling(st, TilingParams(stride=114, max_tiles=s.tiles // max(1, len(st.slides())),
                                               tissue_threshold=0.25)).extra["tiling_id"]
            s3 = run_extraction(st, tiling_id=tid3, encoder=name, weights="none", layer=layer, precision="auto",
                                options=ExtractOptions(batch_size=a.batch, workers=a.workers, device=device,
                                                       decode="cpu"))
            res["hefeat_cpu_decode"] = {"tiles": s3.tiles, "decode": s3.extra.get("decode"),
                                        "loop_tiles_per_s": round(s3.tiles / s3.extra["timings"]["loop_s"], 1),
                                        "timings": s3.extra["timings"]}
        if a.profile:
            tid4 = run_tiling(st, TilingParams(stride=115, max_tiles=s.tiles // max(1, len(st.slides())),
                                               tissue_threshold=0.25)).extra["tiling_id"]
            res["hefeat_profiled"] = _profiled(st, tid4, name, layer, opt, a.profile)
        tiles = st.tiles(tid, st.slides()["slide_id"].iloc[0]).head(64)
        with Slide(st.slides()["path"].iloc[0]) as sl:
            imgs = np.stack([sl.read(x, y, 224, 0.5) for x, y in tiles[["x", "y"]].to_numpy()])
        bare = _bare(name, layer, imgs, device=device, precision=prec, channels_last=cl, batch=a.batch,
                     seconds=a.bare_seconds)
        res["bare_tiles_per_s"] = round(bare, 1)
        if device.startswith("cuda"):
            res["device_decode_per_batch"] = {f"stride_{k}": _decode_breakdown(st.slides()["path"].iloc[0], device,
                                                                               a.batch, k) for k in (112, 224)}
        marks["total_s"] = round(time.perf_counter() - t_start, 1)
        res["phases"] = marks
        res["ratio_loop_over_bare"] = round(loop / bare, 3)
        res["ratio_cached_call_over_bare"] = round(s2.tiles / wall2 / bare, 3)
        res["goal_5000_tiles_per_s"] = bool(loop >= 5000)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
