"""Fine-tuning throughput and EMO's cost, measured in one run.

1. Training images/s of a real job (tiles read from the slides by DataLoader workers, device-side
   augmentation, AMP as the job chose it, optimiser, checkpoints) vs the bare forward + backward of
   the same backbone at the same precision, memory format and batch on tensors already in memory
   (also reported: bare forward + backward + optimiser step). Bare is timed before and after the
   job and averaged, so drift of a shared machine hits both sides.
2. EMO (--emo): FLOPs of Inception-v3 at 299 px counted by torch; the cost of one network with one
   output per gene vs one network per gene, at the paper's 17,695 genes; and the measured training
   throughput with 1 vs 17,695 outputs (what the FLOP count predicts, checked).

Run: python benchmarks/finetune.py [--backbone densenet121] [--batch 8] [--steps 6] [--epochs 3] [--emo]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _store(d: Path, n_slides: int):
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_spots

    make_cohort(d / "c", n_slides=n_slides, n_genes=60, seed=3, width_um=1600, height_um=1200)
    st = Store.init(d / "st")
    ingest_slides(st, sorted(glob.glob(str(d / "c" / "slides" / "*.tiff"))))
    ingest_spots(st, d / "c" / "spots.parquet")
    return st, run_tiling(st, TilingParams(spots=True, size=224, mpp=0.5)).extra["tiling_id"]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_rates(recipe, n_out: int, precision: str, channels_last: bool, imgs, steps: int) -> dict:
    """Images/s of forward + backward (and + optimiser step) of the job's network on in-memory tensors, with freed
    memory kept for reuse as the job trains (hefeat.heap; HEFEAT_HEAP=system times both under glibc's defaults)."""
    import torch

    from hefeat.extract.compute import DeviceTransform
    from hefeat.finetune.train import autocast, build_net, make_optimizer
    from hefeat.heap import reuse_freed_memory

    dev = _device()
    net, cfg = build_net(recipe, n_out)
    net.train().to(dev).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = DeviceTransform(cfg, dev, channels_last=channels_last)(imgs)
    y = torch.zeros(len(x), n_out, device=dev)
    opt = make_optimizer(recipe, net.parameters())

    def run(n: int, step: bool) -> float:
        _sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            with autocast(dev, precision):
                out = net(x)
            torch.nn.functional.mse_loss(out.float(), y).backward()
            if step:
                opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(dev)
        return n * len(x) / (time.perf_counter() - t)

    with reuse_freed_memory():
        run(1, True)  # warm-up
        return {"fwd_bwd": run(steps, False), "fwd_bwd_step": run(steps, True)}


class GpuUtilisation:
    """Mean GPU utilisation (nvidia-smi's %, via torch.cuda.utilization) sampled every 0.5 s; None on a CPU."""

    def __enter__(self):
        import threading

        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if _device() == "cuda":
            self.thread.start()
        return self

    def _run(self) -> None:
        import torch

        while not self.stop.wait(0.5):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML (pynvml) on this machine
                return

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def mean(self) -> float | None:
        """Mean of the samples (None when none could be taken)."""
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def throughput(a) -> dict:
    import numpy as np

    from hefeat.finetune.data import TileImages, TileSource
    from hefeat.finetune.ddp import Dist
    from hefeat.finetune.job import choose_precision, make_folds, run_job
    from hefeat.finetune.recipe import RunOptions, recipe_from_dict
    from hefeat.finetune.tasks import load_task
    from hefeat.slides.reader import Slide
    from hefeat.store.atomic import read_json

    with tempfile.TemporaryDirectory() as d:
        st, tid = _store(Path(d), a.slides)
        r = recipe_from_dict({"task": "spots", "params": {
            "tiling_id": tid, "backbone": a.backbone, "weights": "none", "precision": a.precision, "genes": "top:50",
            "split": "patient-kfold:2", "folds": ["fold1"], "val_share": 0.0, "baseline": "none", "tta": False,
            "batch_size": a.batch, "steps_per_epoch": a.steps, "epochs": a.epochs, "optimizer": "sgd", "lr": 1e-3}})
        tiles = st.sql(f"SELECT x, y, s.path FROM tiles t JOIN slides s USING (slide_id) WHERE tiling_id = '{tid}' LIMIT {a.batch}")
        imgs = []
        for path, g in tiles.groupby("path"):
            with Slide(path) as s:
                imgs += [s.read(x, y, 224, 0.5) for x, y in g[["x", "y"]].to_numpy()]
        import torch

        imgs = torch.from_numpy(np.stack(imgs))
        # The job's own precision decision (measured once, cached per machine + model: the job reuses it).
        data = load_task(st, r)
        src = TileSource.from_samples(data.samples, data.slides, size=224, mpp=0.5)
        choice, _ = choose_precision(r, data, TileImages(src), make_folds(r, data)[0].train, Dist(device=_device()))
        prec, cl = choice.precision, choice.channels_last
        before = bare_rates(r, 50, prec, cl, imgs, a.bare_steps)
        t0 = time.perf_counter()
        with GpuUtilisation() as util:
            s = run_job(st, r, RunOptions(workers=a.workers, checkpoint_every=a.checkpoint_every))
        job_s = time.perf_counter() - t0
        job = read_json(st.job_dir(s["job_id"]) / "job.json")
        assert job["precision"] == prec, "the job chose another precision than the bare loop uses"
        hist = read_json(st.job_dir(s["job_id"]) / "fold=fold1" / "metrics.json")
        after = bare_rates(r, 50, prec, cl, imgs, a.bare_steps)
    bare = {k: (before[k] + after[k]) / 2 for k in before}
    steady = [h["images_per_s"] for h in hist[1:]] or [hist[0]["images_per_s"]]
    train = float(np.median(steady))
    return {"device": _device(), "gpu_utilisation_percent": util.mean(), "backbone": a.backbone, "input_px": 224,
            "precision": prec, "channels_last": cl,
            "precision_reason": choice.reason, "batch": a.batch, "workers": a.workers,
            "steps_per_epoch": a.steps, "epochs": a.epochs, "checkpoint_every": a.checkpoint_every,
            "train_images_per_s_by_epoch": [h["images_per_s"] for h in hist],
            "train_images_per_s": round(train, 2), "bare_fwd_bwd_images_per_s": round(bare["fwd_bwd"], 2),
            "bare_fwd_bwd_step_images_per_s": round(bare["fwd_bwd_step"], 2),
            "bare_before_after": [round(before["fwd_bwd"], 2), round(after["fwd_bwd"], 2)],
            "ratio_vs_fwd_bwd": round(train / bare["fwd_bwd"], 3),
            "ratio_vs_fwd_bwd_step": round(train / bare["fwd_bwd_step"], 3), "job_seconds": round(job_s, 1)}


def emo(a) -> dict:
    """Counted FLOPs and measured training throughput of Inception-v3 with 1 vs 17,695 outputs."""
    import torch

    from hefeat.finetune.cost import PAPER_GENES, emo_cost, forward_flops
    from hefeat.finetune.recipe import recipe_from_dict
    from hefeat.finetune.train import build_net

    r = recipe_from_dict({"task": "genes", "params": {"backbone": "inception_v3", "weights": "none",
                                                      "optimizer": "adam", "lr": 1e-6, "batch_size": a.emo_batch}})
    dev = _device()
    net1, cfg = build_net(r, 1)
    flops = forward_flops(net1.backbone, cfg.input_size[0])
    x = torch.randn(a.emo_batch, 3, *cfg.input_size, device=dev).contiguous(memory_format=torch.channels_last)

    def rate(n_out: int) -> float:
        net, _ = build_net(r, n_out)
        net.train().to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-6)
        y = torch.zeros(len(x), n_out, device=dev)
        best = 0.0
        for i in range(a.emo_steps + 1):
            _sync(dev)
            t = time.perf_counter()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            if i:  # the first step warms up
                best = max(best, len(x) / (time.perf_counter() - t))
        return best

    r1, rg = rate(1), rate(PAPER_GENES)
    c = emo_cost(flops, cfg.dim, PAPER_GENES, images_per_s=rg, images_per_network=150 * 32 * 100)
    c.update(measured_images_per_s_1_output=round(r1, 3), measured_images_per_s_17695_outputs=round(rg, 3),
             measured_ratio_per_gene_vs_one_network=round(PAPER_GENES * rg / r1, 1), batch=a.emo_batch,
             images_per_network_assumed="150 steps x 32 images x 100 epochs (EMO's schedule; early stopping "
                                        "usually ends before its 500-epoch cap)")
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--bare-steps", type=int, default=4)
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--emo", action="store_true", help="also the EMO cost section (Inception-v3, 17,695 outputs)")
    ap.add_argument("--emo-batch", type=int, default=4)
    ap.add_argument("--emo-steps", type=int, default=2)
    a = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "load_before": os.getloadavg()}
    out["throughput"] = throughput(a)
    if a.emo:
        out["emo_cost"] = emo(a)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
