"""The extraction pipeline: tiles of many slides -> embeddings, one HDF5 file per slide.

DataLoader workers read tiles (OpenSlide) in tile-aligned scan order; uint8 batches go to the
device, where the encoder's own transform runs; autocast; optional 8-fold dihedral TTA; a
background thread writes each batch while the next one computes. Batches never span slides, so a
slide's features do not depend on which other slides ran with it (resume is byte-identical).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hefeat import __version__
from hefeat.errors import HefeatError
from hefeat.extract.encoders import Encoder, EncoderConfig, create_encoder
from hefeat.runner import RunSummary, SlideClaim, shard_slides
from hefeat.store.atomic import clean_stale_tmp, write_json
from hefeat.store.catalog import Store
from hefeat.store.features import FeatureFileWriter
from hefeat.store.ids import content_id
from hefeat.store.runs import record_run, timestamp

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use, minus one for the main process."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(n - 1, 16))


def resolve_device(device: str | None = None) -> str:
    """'cuda' when a GPU is visible, else 'cpu' (or the given device)."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """Concrete precision for 'auto': bf16 on GPUs that support it (else fp16); bf16 on AVX-512 CPUs."""
    import torch

    if precision not in PRECISIONS:
        raise HefeatError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cap = torch.backends.cpu.get_cpu_capability()
    return "bf16" if ("AVX512" in cap or "AMX" in cap) else "fp32"


def extraction_id(tiling_id: str, cfg: EncoderConfig, *, precision: str, tta: bool, dtype: str) -> str:
    """Content-derived id over tiling, encoder, weights digest, layer, transform, precision, TTA and dtype."""
    return content_id({"tiling": tiling_id, "encoder": cfg.to_dict(), "precision": precision, "tta": tta,
                       "dtype": dtype, "code": __version__.rsplit(".", 1)[0]}, prefix="e")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass
class _SlideJob:
    slide_id: str
    path: str
    mpp: float
    coords: np.ndarray  # (n, 2) level-0 x, y
    size0: float
    start: float = 0.0
    failed: str | None = None
    writer: FeatureFileWriter | None = None


class TileDataset:
    """Map-style dataset over (slide, tile) pairs; each worker keeps its slides open."""

    def __init__(self, jobs: list[_SlideJob], size: int, mpp: float):
        self.items = [(j.path, j.mpp) for j in jobs]
        self.coords = [j.coords for j in jobs]
        self.offsets = np.cumsum([0] + [len(c) for c in self.coords])
        self.size, self.mpp = size, mpp
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _slide(self, k: int):
        from hefeat.slides.reader import Slide

        s = self._open.get(k)
        if s is None:
            for old in list(self._open):  # keep one slide open per worker
                self._open.pop(old).close()
            path, mpp = self.items[k]
            s = self._open[k] = Slide(path, mpp=mpp)
        return s

    def __getitem__(self, i: int):
        import torch

        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        t = i - int(self.offsets[k])
        x, y = self.coords[k][t]
        try:
            img = self._slide(k).read(float(x), float(y), self.size, self.mpp)
            err = ""
        except Exception as e:  # a broken region fails its slide, not the batch
            img = np.zeros((self.size, self.size, 3), np.uint8)
            err = f"{type(e).__name__}: {e}"
        return torch.from_numpy(np.ascontiguousarray(img)), k, t, err


def per_slide_batches(offsets: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches of global indices that never cross a slide boundary, each slide from its tile 0."""
    out = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        out.extend(list(range(s, min(s + batch_size, b))) for s in range(int(a), int(b), batch_size))
    return out


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Compute
# ----------------------------------------------------------------------------------------------
class DeviceTransform:
    """uint8 NHWC batch -> normalised float NCHW (channels-last) on the device, per the encoder config."""

    def __init__(self, cfg: EncoderConfig, device: str):
        import torch

        self.size = cfg.input_size
        self.mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device

    def __call__(self, x_uint8):
        import torch
        import torch.nn.functional as F

        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode=self.mode, antialias=True, align_corners=False).clamp_(0, 255)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def dihedral(x):
    """The 8 rotations/reflections of a NCHW batch."""
    import torch

    out = []
    for flip in (False, True):
        base = torch.flip(x, dims=(3,)) if flip else x
        out.extend(torch.rot90(base, k, dims=(2, 3)) for k in range(4))
    return out


def autocast_context(device: str, precision: str):
    """torch.autocast for bf16/fp16, a null context for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def embed_batch(enc: Encoder, transform: DeviceTransform, x_uint8, *, device: str, precision: str, tta: bool = False):
    """Embeddings (B, dim) float32 tensor on the device for a uint8 NHWC batch."""
    import torch

    x = transform(x_uint8)
    with torch.inference_mode(), autocast_context(device, precision):
        if tta:
            return torch.stack([enc(v).float() for v in dihedral(x)]).mean(0)
        return enc(x).float()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class _Writer(threading.Thread):
    """Background writer: appends batches to per-slide files, commits finished slides, records status."""

    def __init__(self, store: Store, eid: str, jobs: list[_SlideJob], open_writer, info: dict):
        super().__init__(daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.store, self.eid, self.jobs, self.open_writer, self.info = store, eid, jobs, open_writer, info
        self.ok: list[str] = []
        self.failed: dict[str, str] = {}
        self.tiles = 0
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            t = time.perf_counter()
            try:
                self._handle(*item)
            except BaseException as e:  # surfaced by the main thread
                self.error = e
                return
            finally:
                self.seconds += time.perf_counter() - t

    def _handle(self, k: int, start: int, rows: np.ndarray | None, err: str | None) -> None:
        job = self.jobs[k]
        if err:
            self.fail(k, err)
            return
        if job.failed:
            return
        if job.writer is None:
            job.writer = self.open_writer(job)
        job.writer.write(start, rows)
        if job.writer.written == len(job.coords):
            job.writer.commit()
            job.writer = None
            sec = time.perf_counter() - job.start
            n = len(job.coords)
            self.store.write_status("extraction", self.eid, job.slide_id, {
                "state": "ok", "reason": None, "seconds": round(sec, 4), "n_tiles": n,
                "tiles_per_s": round(n / sec, 2) if sec > 0 else None, "finished_at": timestamp(),
                "path": str(self.store.features_path(self.eid, job.slide_id)), **self.info})
            self.ok.append(job.slide_id)
            self.tiles += n

    def fail(self, k: int, msg: str) -> None:
        job = self.jobs[k]
        job.failed = msg
        if job.writer is not None:
            job.writer.abort()
            job.writer = None
        self.store.write_status("extraction", self.eid, job.slide_id, {
            "state": "failed", "reason": msg, "seconds": round(time.perf_counter() - job.start, 4),
            "n_tiles": 0, "finished_at": timestamp()})
        self.failed[job.slide_id] = msg


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@dataclass
class ExtractOptions:
    """How to run an extraction (none of these change the features except those in the id)."""

    batch_size: int = 64
    workers: int | None = None
    device: str | None = None
    compile: bool = False
    fail_fast: bool = False
    progress: bool = False
    extra: dict = field(default_factory=dict)


def run_extraction(
    store: Store,
    *,
    tiling_id: str | None = None,
    encoder: str = "resnet50",
    weights: str | None = None,
    layer: str | None = None,
    precision: str = "auto",
    tta: bool = False,
    dtype: str = "float16",
    seed: int = 0,
    slides: list[str] | None = None,
    shard: str | None = None,
    options: ExtractOptions | None = None,
) -> RunSummary:
    """Embed every tile of a tiling with an encoder into per-slide HDF5 files; resumable."""

    opt = options or ExtractOptions()
    store.require()
    if dtype not in ("float16", "float32"):
        raise HefeatError(f"--dtype must be float16 or float32, got {dtype!r}")
    if opt.batch_size < 1:
        raise HefeatError("--batch-size must be >= 1")
    tid = tiling_id or _default_tiling(store)
    tiling = store.tiling(tid)
    tiled = store.sql("SELECT slide_id FROM status WHERE stage = 'tiling' AND id = ? AND state = 'ok' ORDER BY 1", [tid])["slide_id"].tolist()
    if slides:
        missing = sorted(set(slides) - set(tiled))
        if missing:
            raise HefeatError(f"Slides not tiled in tiling {tid}: {', '.join(missing)}. Run hefeat tile first.")
        tiled = [s for s in tiled if s in set(slides)]
    ids = shard_slides(tiled, shard)
    device = resolve_device(opt.device)
    prec = resolve_precision(precision, device)
    enc = create_encoder(encoder, weights=weights, layer=layer, seed=seed)
    cfg = enc.config
    eid = extraction_id(tid, cfg, precision=prec, tta=tta, dtype=dtype)
    edir = store.extraction_dir(eid)
    edir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(edir)
    meta_path = edir / "_extraction.json"
    if not meta_path.exists():
        write_json(meta_path, {
            "extraction_id": eid, "tiling_id": tid, "encoder": cfg.name, "layer": cfg.layer, "weights": cfg.weights,
            "weights_source": str(Path(weights).absolute()) if weights and Path(weights).exists() else (weights or "imagenet"),
            "seed": seed,
            "weights_digest": cfg.weights_digest, "dim": cfg.dim, "precision": prec, "tta": tta, "dtype": dtype,
            "transform": {"input_size": list(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std),
                          "interpolation": cfg.interpolation},
            "patch_size": tiling["size"], "mpp": tiling["mpp"], "code_version": __version__,
            "batch_size": opt.batch_size, "created": timestamp(),
        })
    summary = RunSummary("extraction", eid)
    t0 = time.perf_counter()
    slide_rows = store.slides(ids).set_index("slide_id") if ids else None
    jobs: list[_SlideJob] = []
    claims: list[SlideClaim] = []
    from hefeat.slides.run import open_catalog_slide

    try:
        for sid in ids:
            if store.features_path(eid, sid).exists():
                summary.done.append(sid)
                continue
            claim = SlideClaim(store.status_dir("extraction", eid) / f"{sid}.lock")
            if not claim.acquire():
                summary.busy.append(sid)
                continue
            claims.append(claim)
            if store.features_path(eid, sid).exists():
                summary.done.append(sid)
                continue
            try:
                row = slide_rows.loc[sid]
                with open_catalog_slide(row) as s:
                    s.read(0, 0, 8, s.mpp.x)  # the file opens and decodes
                tiles = store.tiles(tid, sid)
            except Exception as e:
                msg = str(e) if isinstance(e, HefeatError) else f"{type(e).__name__}: {e}"
                store.write_status("extraction", eid, sid, {"state": "failed", "reason": msg, "seconds": 0.0,
                                                            "n_tiles": 0, "finished_at": timestamp()})
                summary.failed[sid] = msg
                if opt.fail_fast:
                    raise HefeatError(f"extraction failed on slide {sid}: {msg}") from None
                continue
            jobs.append(_SlideJob(sid, row["path"], float(row["mpp_x"]), tiles[["x", "y"]].to_numpy(np.int64),
                                  float(tiles["size0"].iloc[0]) if len(tiles) else 0.0))

        info = {"dim": cfg.dim, "batch_size": opt.batch_size, "precision": prec, "device": device}
        timings = _extract_jobs(store, eid, jobs, enc, tiling, cfg, device=device, precision=prec, tta=tta,
                                dtype=dtype, opt=opt, info=info, summary=summary)
    finally:
        for c in claims:
            c.release()
    summary.seconds = time.perf_counter() - t0
    summary.extra.update({"extraction_id": eid, "tiling_id": tid, "encoder": cfg.name, "layer": cfg.layer,
                          "dim": cfg.dim, "precision": prec, "device": device, "batch_size": opt.batch_size,
                          "timings": timings})
    summary.extra["run_id"] = record_run(store, "extract", summary.to_dict(), params={
        "encoder": encoder, "weights": weights, "layer": layer, "precision": prec, "tta": tta, "dtype": dtype,
        "batch_size": opt.batch_size, "workers": opt.workers, "shard": shard})
    return summary


def _default_tiling(store: Store) -> str:
    t = store.sql("SELECT tiling_id FROM tilings WHERE NOT spots ORDER BY created")
    if t.empty:
        raise HefeatError("No tiling in the store yet. Run: hefeat tile --mpp 0.5 --size 224")
    if len(t) > 1:
        raise HefeatError(f"The store has several tilings ({', '.join(t['tiling_id'])}); pass --tiling ID")
    return str(t["tiling_id"].iloc[0])


def _extract_jobs(store, eid, jobs, enc, tiling, cfg, *, device, precision, tta, dtype, opt, info, summary) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    timings = {"read_wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "loop_s": 0.0}
    if not jobs:
        return timings
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    enc.net.to(device).to(memory_format=torch.channels_last)
    if opt.compile:
        enc.net = torch.compile(enc.net)
    transform = DeviceTransform(cfg, device)
    ds = TileDataset(jobs, int(tiling["size"]), float(tiling["mpp"]))
    workers = default_workers() if opt.workers is None else opt.workers
    loader = DataLoader(ds, batch_sampler=per_slide_batches(ds.offsets, opt.batch_size), num_workers=workers,
                        pin_memory=device.startswith("cuda"), worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=4 if workers else None, persistent_workers=False)

    def open_writer(job: _SlideJob) -> FeatureFileWriter:
        return FeatureFileWriter(store.features_path(eid, job.slide_id), len(job.coords), cfg.dim, dtype=dtype,
                                 coords=job.coords, attrs={
                                     "encoder": cfg.name, "layer": cfg.layer or "", "weights": cfg.weights,
                                     "weights_digest": cfg.weights_digest, "dim": cfg.dim,
                                     "patch_size": int(tiling["size"]), "patch_size_level0": job.size0,
                                     "mpp": float(tiling["mpp"]), "tiling_id": tiling["tiling_id"],
                                     "extraction_id": eid, "slide_id": job.slide_id, "precision": precision})

    writer = _Writer(store, eid, jobs, open_writer, info)
    writer.start()
    bar = tqdm(total=len(ds), disable=not opt.progress, desc=f"extract {eid}", unit="tile")
    t_loop = time.perf_counter()
    try:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                imgs, ks, ts, errs = next(it)
            except StopIteration:
                break
            timings["read_wait_s"] += time.perf_counter() - t
            k = int(ks[0])
            job = jobs[k]
            if job.start == 0.0:
                job.start = time.perf_counter()
            bad = [e for e in errs if e]
            if job.failed or bad:
                if bad and not job.failed:
                    job.failed = "pending"
                    _put(writer, (k, 0, None, f"reading tile {int(ts[errs.index(bad[0])])}: {bad[0]}"))
                    if opt.fail_fast:
                        raise HefeatError(f"extraction failed on slide {job.slide_id}: {bad[0]}")
                bar.update(len(ks))
                continue
            t = time.perf_counter()
            feats = embed_batch(enc, transform, imgs, device=device, precision=precision, tta=tta)
            rows = feats.cpu().numpy()
            timings["compute_s"] += time.perf_counter() - t
            _put(writer, (k, int(ts[0]), rows, None))
            bar.update(len(ks))
    finally:
        bar.close()
        writer.q.put(None)
        writer.join()
        timings["loop_s"] = time.perf_counter() - t_loop
        for j in jobs:  # a crash or Ctrl-C leaves no half-written file behind
            if j.writer is not None:
                j.writer.abort()
    if writer.error:
        raise writer.error
    summary.ok.extend(writer.ok)
    summary.failed.update(writer.failed)
    summary.tiles += writer.tiles
    timings["write_s"] = writer.seconds
    return {k: round(v, 3) for k, v in timings.items()}


def _put(writer: _Writer, item) -> None:
    if writer.error:
        raise writer.error
    writer.q.put(item)
