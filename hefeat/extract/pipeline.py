"""The extraction pipeline: tiles of many slides -> embeddings, one HDF5 file per slide.

Tiles are read (OpenSlide, or the direct JPEG reader) in tile-aligned scan order: on the CPU by the
main process's threads between forwards (InProcessTiles), on a GPU by DataLoader workers while the device
computes (or decoded on the device itself); uint8 batches go to the
device, where the encoder's own transform runs; autocast; optional 8-fold dihedral TTA; a
background thread writes each batch while the next one computes.

One stream of full batches runs across slides: a batch may end one slide and begin the next, and
its rows are split back per slide (each slide is still written to its own file and committed on its
own once its last row is in). So many small slides cost what one large one does: no batch is cut
short at a slide's end (only the run's last), and one DataLoader serves the whole run. A tile's
embedding does not depend on which other tiles share its batch (each sample's forward is its own:
tests check that resume and single-slide runs give byte-identical features on the CPU).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from hefeat import (
    __version__,  # noqa: F401  (read by tests and benchmarks)
    fork_gc,
)
from hefeat.cpus import available_cores
from hefeat.errors import HefeatError, NonFiniteError
from hefeat.extract.compute import (  # noqa: F401  (re-exported: the compute side lives in compute.py)
    DeviceTransform,
    InputPlan,
    check_finite,
    dihedral,
    embed_batch,
    feature_attrs,
    plan_input,
)
from hefeat.extract.device_decode import PROBE_SLIDES, cpu_read_note, device_decoded_batches
from hefeat.extract.encoders import Encoder
from hefeat.extract.plan import (  # noqa: F401  (re-exported: the plan side lives in plan.py)
    CALIBRATION_SEED,
    CALIBRATION_TILES,
    DEFAULT_BATCH,
    GPU_BATCH_LADDER,
    PRECISIONS,
    STAIN_SAMPLE,
    ExtractionPlan,
    ExtractOptions,
    calibration_tiles,
    choose_precision,
    extraction_id,
    fit_stain,
    plan_extraction,
    read_precision_decision,
    recorded_choice,
    resolve_device,
)
from hefeat.extract.precision import OTHERS_BUSY, cpu_sample, others_share
from hefeat.extract.reading import (
    ClaimingBatches,
    InProcessTiles,
    Prefetched,
    TileDataset,
    segments,
    storage_note,
    worker_init,
)
from hefeat.extract.writer import FeatureSink, SlideFeatures
from hefeat.heap import reuse_freed_memory
from hefeat.runner import RunSummary, SlideRunner
from hefeat.store import layout
from hefeat.store.atomic import clean_stale_tmp, write_json
from hefeat.store.catalog import Store
from hefeat.store.features import FeatureFileWriter, refresh_aggregates
from hefeat.store.runs import record_run

if TYPE_CHECKING:  # pragma: no cover
    from hefeat.slides.tiling import TilingParams


def import_runtime(*, will_compile: bool = False) -> None:
    """Import now what an extraction runs on (torch, its DataLoader, timm, h5py), which would otherwise
    import on first use: for a caller that wants them imported at one known point (the CLI does it
    with the garbage collector paused, hefeat.cli.common.quiet_gc). Unless the run will compile the
    model, timm is imported without torch._dynamo (hefeat.extract.timm_import: ~1 s less)."""
    import h5py  # noqa: F401
    import torch  # noqa: F401
    import torch.utils.data  # noqa: F401

    from hefeat.extract.timm_import import import_timm

    import_timm(lazy_dynamo=not will_compile)


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use, minus one for the main process."""
    return max(1, min(available_cores() - 1, 16))


# ----------------------------------------------------------------------------------------------
# Reading (hefeat.extract.reading) and writing
# ----------------------------------------------------------------------------------------------
_SlideJob = SlideFeatures  # a claimed slide being embedded and written (hefeat.extract.writer)


class _Writer(threading.Thread):
    """Background writer: hands each batch's rows to the FeatureSink (hefeat.extract.writer), which commits a
    finished slide through the runner."""

    def __init__(self, runner: SlideRunner, jobs: list[_SlideJob], open_writer, info: dict, dtype: str):
        super().__init__(daemon=True, name="hefeat-extract-writer")
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.jobs, self.sink = jobs, FeatureSink(runner, open_writer, info, dtype)
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
            except BaseException as e:  # surfaced by the main thread within one put timeout
                self.error = e
                return
            finally:
                self.seconds += time.perf_counter() - t

    def _handle(self, k: int, start: int, rows: np.ndarray | None, err: str | BaseException | None) -> None:
        if err is not None:
            self.sink.fail(self.jobs[k], err)
        else:
            self.sink.put(self.jobs[k], start, rows)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
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
    fit: str = "auto",
    stain: str | None = None,
    stain_reference: str | None = None,
    options: ExtractOptions | None = None,
    tile_params: TilingParams | None = None,
) -> RunSummary:
    """Embed every tile of a tiling with an encoder into per-slide HDF5 files; resumable.

    precision 'auto' is measured on this machine (see hefeat.extract.precision) and recorded;
    `fit` says how tiles become the encoder's input size (see hefeat.extract.compute.plan_input).
    `stain` ('macenko' | 'reinhard') normalises every tile on the device towards `stain_reference`:
    an image file, or (default) a seeded sample of the tiling's tiles across all its slides.
    `tile_params` names the tiling by its parameters: slides it has not covered yet are tiled and
    embedded from one read of each tile (see hefeat.extract.decode_once), the others as usual.
    The plan is decided by hefeat.extract.plan.plan_extraction, then run by `run_plan`.
    """
    return run_plan(store, plan_extraction(
        store, tiling_id=tiling_id, encoder=encoder, weights=weights, layer=layer, precision=precision, tta=tta,
        dtype=dtype, seed=seed, slides=slides, shard=shard, fit=fit, stain=stain, stain_reference=stain_reference,
        options=options, tile_params=tile_params))


def run_plan(store: Store, ep: ExtractionPlan) -> RunSummary:
    """Run a planned extraction: its metadata, then the claimed slides embedded and committed, then its run record."""
    eid, tid, tiling, cfg, opt, once, todo = ep.extraction_id, ep.tiling_id, ep.tiling, ep.cfg, ep.opt, ep.once, ep.todo
    enc, device, prec, transform, tiled_rows, s = ep.enc, ep.device, ep.precision, ep.transform, ep.tiled_rows, ep.spec
    edir = store.extraction_dir(eid)
    edir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(edir)
    meta_path = edir / layout.EXTRACTION_META
    if not meta_path.exists():
        write_json(meta_path, ep.metadata())
    slide_rows = store.slides(todo).set_index("slide_id") if todo else None
    tiles_digest = dict(zip(tiled_rows["slide_id"], tiled_rows["digest"], strict=True))
    info = {"dim": cfg.dim, "batch_size": opt.batch_size, "precision": prec, "device": device}
    if todo or (once and once.fused):
        _prepare_net(enc, device, transform, opt)
    with SlideRunner(store, "extraction", eid, fail_fast=opt.fail_fast, input_digest=tiles_digest.get) as runner, \
            reuse_freed_memory():  # the forward's activations reuse the last batch's memory (hefeat.heap)
        timings = _extract_jobs(store, runner, todo, slide_rows, enc, tiling, cfg, device=device, precision=prec,
                                tta=s["tta"], dtype=s["dtype"], opt=opt, info=info, transform=transform,
                                expected=int(tiled_rows.set_index("slide_id").loc[todo, "n_tiles"].sum()) if todo else 0)
        if once:
            once.run(store, runner, enc, transform, tiling, cfg, device=device, precision=prec, tta=s["tta"],
                     dtype=s["dtype"], opt=opt, info=info, tiles_digest=tiles_digest, timings=timings)
    summary = runner.summary
    if summary.ok:
        refresh_aggregates(store, eid)  # the consolidated slide table reads in one go
    summary.extra.update({"extraction_id": eid, "tiling_id": tid, "encoder": cfg.name, "layer": cfg.layer,
                          "dim": cfg.dim, "precision": prec, "device": device, "batch_size": opt.batch_size,
                          "precision_choice": {k: ep.choice.to_dict()[k] for k in (
                              "source", "reason", "channels_last", "fold_bn", "fuse_residual")},
                          "encoder_mpp": ep.input.encoder_mpp, "fit": ep.input.fit,
                          "decode": info.get("decode"), "read_note": info.get("read_note"), "timings": {**timings, "calibrate_s": round(ep.calibrate_s, 3)}})
    if once:
        summary.extra["decode_once"] = once.report()
    summary.extra["run_id"] = record_run(store, "extract", summary.to_dict(), params={
        "encoder": s["encoder"], "weights": s["weights"], "layer": s["layer"], "precision": prec, "tta": s["tta"],
        "dtype": s["dtype"], "batch_size": opt.batch_size, "workers": opt.workers, "shard": s["shard"]})
    return summary


def _prepared(store: Store, runner: SlideRunner, todo: list[str], slide_rows, tid: str):
    """Claimed slides, one at a time, checked to open and with their tile coordinates (failures recorded)."""
    from hefeat.slides.reader import open_catalog_slide

    for task in runner.claimed(todo):
        try:
            row = slide_rows.loc[task.slide_id]
            with open_catalog_slide(row) as s:
                s.check_decodes()
            tiles = store.tiles(tid, task.slide_id)
        except Exception as e:
            runner.fail(task, e)
            continue
        yield _SlideJob(task, row["path"], float(row["mpp_x"]), tiles[["x", "y"]].to_numpy(np.int64),
                        float(tiles["size0"].iloc[0]) if len(tiles) else 0.0)


def _prepare_net(enc: Encoder, device: str, transform: DeviceTransform, opt: ExtractOptions) -> None:
    """The encoder on its device, in the chosen memory format, compiled if asked."""
    import torch

    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    enc.net.to(device).to(memory_format=torch.channels_last if transform.channels_last else torch.contiguous_format)
    if opt.compile:
        from hefeat.extract.fold import unfuse_conv_relu

        unfuse_conv_relu(enc.net)  # plain Python for dynamo to trace; inductor fuses by itself
        enc.net = torch.compile(enc.net)


def _extract_jobs(store, runner, todo, slide_rows, enc, tiling, cfg, *, device, precision, tta, dtype, opt, info,
                  expected, transform: DeviceTransform) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    timings = {"read_wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "loop_s": 0.0, "loop_cpu_s": 0.0}
    if not todo:
        return timings
    eid = runner.key
    ds = TileDataset(int(tiling["size"]), float(tiling["mpp"]))
    jobs: list[_SlideJob] = []
    sampler = ClaimingBatches(jobs, _prepared(store, runner, todo, slide_rows, tiling["tiling_id"]), opt.batch_size)
    # On the CPU the forward uses every core, so by default the main process reads between forwards (InProcessTiles)
    workers = (default_workers() if device.startswith("cuda") else 0) if opt.workers is None else opt.workers
    if workers:
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=device.startswith("cuda"),
                            worker_init_fn=worker_init, prefetch_factor=4, persistent_workers=False)
        reader = f"{workers} DataLoader worker{'s' if workers > 1 else ''}"
    else:
        threads = torch.get_num_threads()  # the forward's threads: the cores this process computes on
        loader = InProcessTiles(sampler, ds.size, ds.mpp, threads)
        reader = f"in-process, {threads} thread{'s' if threads > 1 else ''} between forwards"

    def open_writer(job: _SlideJob) -> FeatureFileWriter:
        return FeatureFileWriter(store.features_path(eid, job.slide_id), len(job.coords), cfg.dim, dtype=dtype,
                                 coords=job.coords, attrs=feature_attrs(cfg, tiling, eid, job.slide_id, job.size0, precision))

    writer = _Writer(runner, jobs, open_writer, info, dtype)
    writer.start()
    copies = _HostCopies(device)
    pending = None

    def _finish(item) -> None:
        """Check a computed batch on the host and queue each slide's rows (or its failure) for the writer."""
        segs, n, handle = item
        host = copies.wait(handle)
        for k, first, a, b in segs:
            if jobs[k].failed:
                continue
            rows = host[a:b]
            bad_rows = check_finite(rows, first, precision)
            if bad_rows:  # fails this slide through the runner (reason_code non_finite); the others go on
                jobs[k].failed = "pending"
                _put(writer, (k, 0, None, NonFiniteError(bad_rows)))
            else:
                _put(writer, (k, first, rows.numpy(), None))
        bar.update(n)

    bar = tqdm(total=expected, disable=not opt.progress, desc=f"extract {eid}", unit="tile")
    pad_to = padded_batch(device, opt.batch_size)
    t_loop, cpu_loop, machine_loop = time.perf_counter(), _cpu_seconds(), cpu_sample()
    fork_gc.freeze()  # before the workers fork: their GC would copy the parent's heap (hefeat.fork_gc)
    in_process = None  # the InProcessTiles reader, where it is the one that runs (not the device decode)
    it = None
    try:
        paths = [str(slide_rows.loc[sid, "path"]) for sid in todo[:PROBE_SLIDES]]  # the first ones decide the decode
        it = device_decoded_batches(jobs, sampler.source, paths, ds, opt.batch_size, device, opt.decode, info)
        if it is not None:
            it = Prefetched(it)
        else:
            it = iter(loader)
            info["decode"] = f"{info['decode']}; {reader}"
            in_process = loader if isinstance(loader, InProcessTiles) else None
        while True:
            t = time.perf_counter()
            try:
                imgs, ks, ts, errs = next(it)
            except StopIteration:
                break
            timings["read_wait_s"] += time.perf_counter() - t
            segs = []
            for k, a, b in segments(ks):  # the slides in this batch, in order
                bad = [i for i in range(a, b) if errs[i]]
                if bad and not jobs[k].failed:  # a tile that failed to read fails its slide, not the batch
                    jobs[k].failed = "pending"
                    _put(writer, (k, 0, None, f"reading tile {int(ts[bad[0]])}: {errs[bad[0]]}"))
                if not jobs[k].failed:
                    segs.append((k, int(ts[a]), a, b))
            if not segs:
                bar.update(len(ks))
                continue
            t = time.perf_counter()
            feats = embed_batch(enc, transform, pad_rows(imgs, pad_to), device=device, precision=precision,
                                tta=tta)[:len(ks)]
            # One batch in flight: this batch's features copy back (asynchronously on a GPU) while the
            # previous batch is checked and handed to the writer, so the device never waits on the host.
            current = (segs, len(ks), copies.start(feats))
            if pending is not None:
                _finish(pending)
            pending = current
            timings["compute_s"] += time.perf_counter() - t
        if pending is not None:
            t = time.perf_counter()
            _finish(pending)
            pending = None
            timings["compute_s"] += time.perf_counter() - t
    finally:
        if isinstance(it, Prefetched):
            it.close()  # before the files are aborted below: the thread may be claiming the next slide
        bar.close()
        _stop(writer)
        timings["loop_s"] = time.perf_counter() - t_loop
        if in_process is not None:
            timings["read_cpu_s"] = in_process.read_cpu_s
            others = others_share(machine_loop, cpu_sample())  # other processes' share of the CPUs meanwhile
            info["read_note"] = storage_note(in_process.read_s, in_process.read_cpu_s, timings["loop_s"],
                                             busy=others is not None and others > OTHERS_BUSY)
        for j in jobs:  # a crash or Ctrl-C leaves no half-written file behind
            FeatureSink.abort(j)
        fork_gc.unfreeze()
        note = cpu_read_note(jobs)  # after the writer stopped: each slide's row already has its own decode
        if note:
            info["decode"] = f"{info['decode']}; {note}"
    if writer.error:
        raise _writer_error(writer.error)
    timings["write_s"] = writer.seconds
    del it, loader  # DataLoader workers exit and are reaped: their CPU time counts below
    timings["loop_cpu_s"] = _cpu_seconds() - cpu_loop
    return {k: round(v, 3) for k, v in timings.items()}


def padded_batch(device: str, batch_size: int) -> int | None:
    """The rows every forward gets on `device` (a short batch padded), or None where batches may be short.

    cuDNN's autotuner (cudnn.benchmark, on for extraction) times every convolution's algorithms again for each new
    input shape: the run's short last batch would pay a ResNet-50's autotune inside the loop, for a few rows.
    Padding it to the batch shape already tuned costs at most one batch of compute. (The CPU has no such cost.)"""
    return batch_size if device.startswith("cuda") else None


def pad_rows(x, rows: int | None):
    """`x` with its last row repeated up to `rows` rows (as is when it has as many, or `rows` is None)."""
    if rows is None or len(x) >= rows or not len(x):
        return x
    import torch

    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children (the DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _HostCopies:
    """Device -> host copies of feature batches: asynchronous into a ring of pinned buffers on CUDA, the
    tensor itself on the CPU. `start` returns a handle, `wait` the host tensor (valid until the ring wraps)."""

    RING = 3  # buffers: the batch being computed, the one copying back, the one the writer queue holds a copy of

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.ring: list = []
        self.i = 0

    def start(self, feats):
        """Begin copying `feats` (B, dim) to the host."""
        if not self.cuda:
            return feats
        import torch

        if len(self.ring) < self.RING or self.ring[self.i].shape[0] < feats.shape[0] or \
                self.ring[self.i].shape[1:] != feats.shape[1:] or self.ring[self.i].dtype != feats.dtype:
            buf = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            if len(self.ring) < self.RING:
                self.ring.append(buf)
            else:
                self.ring[self.i] = buf
        host = self.ring[self.i][: feats.shape[0]]
        self.i = (self.i + 1) % self.RING
        host.copy_(feats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def wait(self, handle):
        """The host tensor of a started copy, once it has landed."""
        if not self.cuda:
            return handle.cpu()
        host, done = handle
        done.synchronize()
        return host.clone()  # the writer thread keeps it; the pinned buffer is reused two batches later


PUT_TIMEOUT_S = 0.5


def _put(writer: _Writer, item) -> None:
    """Queue an item for the writer; never blocks on a writer that died (its error is raised instead)."""
    while True:
        if writer.error:
            raise _writer_error(writer.error)
        if not writer.is_alive():
            raise HefeatError("the feature writer stopped unexpectedly; nothing after the last committed slide was kept")
        try:
            writer.q.put(item, timeout=PUT_TIMEOUT_S)
            return
        except queue.Full:
            continue


def _writer_error(e: BaseException) -> BaseException:
    """The writer's error as the run's error (one line unless it is already a HefeatError)."""
    if isinstance(e, (HefeatError, KeyboardInterrupt, SystemExit)):
        return e
    err = HefeatError(f"Writing features failed: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


def _stop(writer: _Writer) -> None:
    """Tell the writer to finish what is queued and wait for it (unless it already died)."""
    while writer.is_alive():
        try:
            writer.q.put(None, timeout=PUT_TIMEOUT_S)
            break
        except queue.Full:
            continue
    writer.join()
