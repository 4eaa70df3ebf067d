"""The training loop of one fold: resumable, deterministic, on one process or many.

Plain torch (+ torchrun for several processes): the loop is short, and owning it is what makes the
resume bitwise — the data order and augmentations are functions of (seed, epoch, step), every RNG
state is checkpointed, and checkpoints fall on optimiser-step boundaries. Lightning Fabric would add
a dependency without removing any of that work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hefeat.errors import HefeatError
from hefeat.finetune import ddp
from hefeat.finetune.augment import Augmenter, counter_generator
from hefeat.finetune.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from hefeat.finetune.data import (
    FoldLoader,
    TileImages,
    epoch_batches,
    eval_batches,
    make_loader,
    micro_batch_size,
    steps_per_epoch,
)
from hefeat.finetune.faults import fault_point
from hefeat.finetune.heads import FoldTargets, activate, loss
from hefeat.store import layout
from hefeat.store.atomic import write_json

if TYPE_CHECKING:
    from hefeat.finetune.recipe import Recipe, RunOptions


def recipe_hint(msg: str) -> str:
    """An encoder error's `hefeat extract` options (--weights X, --encoder X) as a fine-tuning recipe sets them."""
    import re

    msg = re.sub(r"--weights (\S+)", r"--set weights=\1", msg)
    return re.sub(r"--encoder (\S+)", r"--set backbone=\1", msg)


def build_net(r: Recipe, n_out: int, bias: np.ndarray | None = None):
    """(network = backbone + dropout + linear head, encoder config with the recipe's input size)."""
    import warnings

    from hefeat.extract.encoders import RandomWeightsWarning, create_encoder

    with warnings.catch_warnings():  # random init is a legitimate start for training (PathoMCH: from scratch)
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:
            enc = create_encoder(r.backbone, weights=r.weights, seed=r.seed)
        except HefeatError as e:  # the encoder's hints name `hefeat extract` options; a recipe sets values
            raise HefeatError(recipe_hint(str(e))) from None
    cfg = enc.config
    if r.input_size:
        cfg = dataclasses.replace(cfg, input_size=(r.input_size, r.input_size))
    backbone = enc.net
    backbone.requires_grad_(True)
    torch.manual_seed(r.seed + 1)
    net = Net(backbone, cfg.dim, n_out, r.dropout)
    if bias is not None:
        with torch.no_grad():
            net.head.bias.copy_(torch.as_tensor(bias))
    return net, cfg


class Net(torch.nn.Module):
    """A timm backbone (pooled features, num_classes=0), dropout, one linear layer (row j = output j's head)."""

    def __init__(self, backbone, dim: int, n_out: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(dim, n_out)

    def forward(self, x):
        """x: normalised (B, 3, H, W) -> (B, n_out)."""
        return self.head(self.drop(self.backbone(x)))


def make_optimizer(r: Recipe, params):
    """SGD with momentum (ST-Net), Adam (EMO, PathoMCH) or AdamW."""
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)


def make_scheduler(r: Recipe, opt, total_steps: int):
    """Per-step LambdaLR (constant or cosine, with linear warm-up) or per-epoch ReduceLROnPlateau."""
    if r.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    warm = max(r.warmup_steps, 0)

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        if r.schedule == "cosine":
            return w * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return w

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def autocast(device: str, precision: str):
    """Mixed precision context of the extraction (hefeat.extract.precision): bf16/fp16 autocast, or none."""
    from hefeat.extract.precision import autocast as _autocast

    return _autocast(device, precision)


def make_transform(s: FoldSetup, cfg):
    """The extraction's device transform (input plan, mean/std, memory format) for this job."""
    from hefeat.extract.compute import DeviceTransform

    return DeviceTransform(cfg, s.dist.device, plan=s.input_plan, channels_last=s.channels_last)


def training_step(model, x):
    """One forward + backward (what AMP calibration times for training); returns the output."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(x)
        out.float().square().mean().backward()
    return out.detach()


@dataclass
class FoldPlan:
    """Sample indices of one fold: train (fits), val (early stopping; may be empty), test (held out)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class FoldSetup:
    """Everything a fold's loop needs besides the plan."""

    recipe: Recipe
    kind: str
    n_out: int
    targets: np.ndarray  # (n_samples, n_out or 1) float32 with NaN = no label
    slide_of: np.ndarray
    dataset: TileImages
    fold_dir: Path
    job_id: str
    precision: str
    dist: ddp.Dist
    options: RunOptions
    workers: int
    input_plan: object = None  # hefeat.extract.compute.InputPlan: how tiles become the backbone's input
    channels_last: bool = True


def _new_state() -> dict:
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": math.inf, "best_epoch": -1, "bad_epochs": 0,
            "stopped": False, "history": [], "loss_sum": 0.0, "loss_n": 0}


def train_fold(s: FoldSetup, plan: FoldPlan, ft: FoldTargets, bias: np.ndarray) -> dict:
    """Train (or resume) one fold; leaves best.pt (best validation epoch), final.pt (last epoch) and the logs."""
    r, d = s.recipe, s.dist
    dev = d.device
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    net, cfg = build_net(r, s.n_out, bias)
    net = net.to(dev).to(memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
    model = ddp.wrap(net, d)
    opt = make_optimizer(r, net.parameters())
    steps = steps_per_epoch(len(plan.train), r.batch_size, r.steps_per_epoch)
    sched = make_scheduler(r, opt, steps * r.epochs)
    scaler = torch.amp.GradScaler("cuda") if (s.precision == "fp16" and dev.startswith("cuda")) else None
    torch.manual_seed(r.seed * 1000 + d.rank + 1)  # dropout masks: one stream per rank
    state = _new_state()
    last, best = s.fold_dir / layout.FOLD_LAST, s.fold_dir / layout.FOLD_BEST
    ck = load_checkpoint(last)
    if ck is not None:
        if ck.get("world") != d.world:
            raise HefeatError(f"Fold {plan.name} was checkpointed by {ck.get('world')} processes and is resumed by "
                              f"{d.world}; resume with the same number, or delete {last} to restart the fold")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = ck["state"]
        restore_rng(ck["rng"][d.rank])
    transform = make_transform(s, cfg)
    aug = Augmenter(r.augment, mean=transform.mean, std=transform.std, hed_sigma=r.hed_sigma, jitter=r.jitter)
    targets = torch.as_tensor(s.targets)
    micro_batch_size(r.batch_size, r.accumulate, d.world)  # fails early with the fix
    pin = dev.startswith("cuda")

    def checkpoint(path: Path, step: int | None = None) -> None:
        rng = ddp.gather(d, capture_rng())
        if d.main:
            save_checkpoint(path, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                                   "state": state, "rng": rng, "world": d.world, "job_id": s.job_id,
                                   "fold": plan.name}, step=step)

    # One loader per fold: its workers start once and serve every epoch and validation pass.
    loader = FoldLoader(s.dataset, workers=s.workers, pin=pin, seed=int(counter_generator(r.seed, 0, 3).initial_seed()))
    try:
        return _train_epochs(s, plan, ft, net, model, opt, sched, scaler, state, transform, aug, targets, loader,
                             checkpoint, steps, last, best)
    finally:
        loader.close()


def _train_epochs(s, plan, ft, net, model, opt, sched, scaler, state, transform, aug, targets, loader, checkpoint,
                  steps, last, best) -> dict:
    """The epoch loop of train_fold (the fold's loader around it is closed by the caller)."""
    from tqdm import tqdm

    r, d = s.recipe, s.dist
    dev = d.device
    while state["epoch"] < r.epochs and not state["stopped"]:
        e = state["epoch"]
        batches = epoch_batches(s.slide_of, plan.train, global_batch=r.batch_size, accumulate=r.accumulate,
                                steps=steps, seed=r.seed, epoch=e, rank=d.rank, world=d.world)
        first = state["step_in_epoch"]
        if first == 0:  # which slides each rank reads this epoch (whole slides per rank)
            mine = sorted({int(k) for b in batches for k in s.slide_of[b]})
            state.setdefault("shards", []).append(ddp.gather(d, mine))
        it = loader.batches(batches[first * r.accumulate:])
        model.train()
        t0, done_here = time.perf_counter(), 0
        bar = tqdm(total=steps, initial=first, disable=not (s.options.progress and d.main), unit="step",
                   desc=f"{plan.name} epoch {e + 1}/{r.epochs}")
        running = torch.zeros((), dtype=torch.float64, device=dev)
        for step in range(first, steps):
            for a in range(r.accumulate):
                imgs, idx = next(it)
                x = aug(transform(imgs), counter_generator(r.seed, e, step, a, d.rank))
                y = targets[idx].to(dev, non_blocking=True)
                sync = model.no_sync() if (d.world > 1 and a < r.accumulate - 1) else contextlib.nullcontext()
                with sync:
                    with autocast(dev, s.precision):
                        out = model(x)
                    lv = loss(s.kind, out, y, ft) / r.accumulate
                    (scaler.scale(lv) if scaler else lv).backward()
                running += lv.detach().double()
            if r.grad_clip:
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), r.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if r.schedule != "plateau":
                sched.step()
            state["global_step"] += 1
            state["step_in_epoch"] = step + 1
            state["loss_n"] += 1
            done_here += 1
            bar.update(1)
            fault_point("step", state["global_step"])
            every = s.options.checkpoint_every
            if every and state["global_step"] % every == 0 and step + 1 < steps:
                state["loss_sum"] += sum(ddp.gather(d, float(running.item())))  # every rank's, identical everywhere
                running.zero_()
                checkpoint(last, state["global_step"])
        bar.close()
        state["loss_sum"] += sum(ddp.gather(d, float(running.item())))
        seconds = time.perf_counter() - t0
        val_loss = evaluate_loss(s, net, plan.val, ft, transform, loader=loader)
        train_loss = state["loss_sum"] / max(state["loss_n"] * d.world, 1)
        monitor = val_loss if val_loss is not None else train_loss
        row = {"epoch": e + 1, "step": state["global_step"], "train_loss": train_loss, "val_loss": val_loss,
               "lr": float(opt.param_groups[0]["lr"]), "seconds": round(seconds, 3),
               "images_per_s": round(done_here * r.batch_size / seconds, 2) if seconds > 0 else None}
        if monitor < state["best"] - r.min_delta or state["best_epoch"] < 0:
            state.update(best=monitor, best_epoch=e + 1, bad_epochs=0)
            if d.main:
                save_checkpoint(best, {"model": net.state_dict(), "epoch": e + 1, "monitor": monitor})
        else:
            state["bad_epochs"] += 1
            if r.patience and state["bad_epochs"] >= r.patience:
                state["stopped"] = True
        row["best_epoch"] = state["best_epoch"]
        state["history"].append(row)
        if r.schedule == "plateau":
            sched.step(monitor)
        fault_point("epoch-end", e + 1)
        state.update(epoch=e + 1, step_in_epoch=0, loss_sum=0.0, loss_n=0)
        checkpoint(last, state["global_step"])
        if d.main:
            write_history(s.fold_dir, state["history"])
    if d.main:
        save_checkpoint(s.fold_dir / layout.FOLD_FINAL, {"model": net.state_dict(), "epoch": state["epoch"]})
    digests = ddp.gather(d, weights_digest(net))
    return {"history": state["history"], "best_epoch": state["best_epoch"], "stopped_early": bool(state["stopped"]),
            "steps": state["global_step"], "steps_per_epoch": steps, "processes": d.world,
            "final_weights_digest_per_rank": digests, "slides_per_rank_per_epoch": state.get("shards", [])}


def weights_digest(net) -> str:
    """sha256 of the model's tensors (every rank of a DDP job must agree)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_history(fold_dir: Path, history: list[dict]) -> None:
    """Per-epoch metrics as metrics.csv and metrics.json (rewritten whole, atomically)."""
    import pandas as pd

    from hefeat.store.atomic import atomic_path

    write_json(fold_dir / layout.FOLD_METRICS, history)
    with atomic_path(fold_dir / layout.FOLD_METRICS_CSV) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def evaluate_loss(s: FoldSetup, net, idx: np.ndarray, ft: FoldTargets, transform,
                  loader: FoldLoader | None = None) -> float | None:
    """Mean loss over validation samples (no augmentation), identical on every rank; None if no samples.

    `loader`: the fold's persistent loader (else a one-off one)."""
    if len(idx) == 0:
        return None
    net.eval()
    total, n = 0.0, 0
    bs = s.options.eval_batch_size or micro_batch_size(s.recipe.batch_size, s.recipe.accumulate, s.dist.world)
    batches = eval_batches(s.slide_of, idx, bs, rank=s.dist.rank, world=s.dist.world)
    it = loader.batches(batches) if loader is not None else make_loader(s.dataset, batches, workers=s.workers,
                                                                         pin=False, seed=0)
    with torch.inference_mode():
        for imgs, bidx in it:
            with autocast(s.dist.device, s.precision):
                out = net(transform(imgs))
            total += float(loss(s.kind, out, torch.as_tensor(s.targets)[bidx].to(s.dist.device), ft)) * len(bidx)
            n += len(bidx)
    net.train()
    parts = ddp.gather(s.dist, (total, n))
    tot, cnt = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return tot / cnt if cnt else None


def infer(s: FoldSetup, fn, idx: np.ndarray, transform, *, tta: bool, width: int) -> np.ndarray:
    """fn(x) -> (B, width) numpy for samples idx (in idx order), averaged over the 8 dihedral views with tta.

    Samples are split over ranks by slide and gathered back, so every rank gets the full array.
    """
    from hefeat.extract.compute import dihedral

    bs = s.options.eval_batch_size or max(1, micro_batch_size(s.recipe.batch_size, s.recipe.accumulate, s.dist.world))
    batches = eval_batches(s.slide_of, idx, bs, rank=s.dist.rank, world=s.dist.world)
    loader = make_loader(s.dataset, batches, workers=s.workers, pin=False, seed=0)
    got_idx, got = [], []
    with torch.inference_mode():
        for imgs, bidx in loader:
            x = transform(imgs)
            with autocast(s.dist.device, s.precision):
                views = dihedral(x) if tta else [x]
                out = np.mean([fn(v) for v in views], axis=0)
            got_idx.append(bidx.numpy())
            got.append(out)
    mine = (np.concatenate(got_idx) if got_idx else np.zeros(0, np.int64),
            np.concatenate(got) if got else np.zeros((0, width)))
    parts = ddp.gather(s.dist, mine)
    all_idx = np.concatenate([p[0] for p in parts])
    all_out = np.concatenate([p[1] for p in parts])
    pos = {int(i): k for k, i in enumerate(all_idx)}
    return all_out[[pos[int(i)] for i in idx]]


def predict_fold(s: FoldSetup, plan: FoldPlan, ft: FoldTargets) -> np.ndarray:
    """Held-out predictions (len(plan.test), n_out) of the fold's best weights, with the recipe's TTA."""
    net, cfg = build_net(s.recipe, s.n_out)
    ck = load_checkpoint(s.fold_dir / layout.FOLD_BEST)
    if ck is None:
        raise HefeatError(f"Fold {plan.name} has no best.pt; its training did not finish an epoch")
    net.load_state_dict(ck["model"])
    net = net.to(s.dist.device).to(memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
    net.eval()
    transform = make_transform(s, cfg)
    return infer(s, lambda v: activate(s.kind, net(v), ft), plan.test, transform, tta=s.recipe.tta, width=s.n_out)
