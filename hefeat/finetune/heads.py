"""What a fine-tuning head trains and outputs, by head kind (regression, binary, multiclass), whatever the task.

Losses: regression targets are standardised per output on the fold's training samples (so one
network weighs every gene alike; the papers' per-gene networks needed no such choice), MSE over the
outputs kept by the training-set filter; binary labels: BCE with logits, masked where a sample has
no training label for an output; multi-class: cross-entropy. The per-task parts (targets, evaluation,
baseline, wording) are the task registrations in tasks.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hefeat.finetune.targets import TaskData


@dataclass(frozen=True)
class FoldTargets:
    """Per-fold target scaling and the outputs trained (regression); identity for labels."""

    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray

    def to_dict(self) -> dict:
        """Arrays as lists (for fold records)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "mask": self.mask.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FoldTargets:
        """Inverse of to_dict."""
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32), np.asarray(d["mask"], bool))


def fold_targets(data: TaskData, train: np.ndarray, *, min_variance: float, standardize: bool) -> FoldTargets:
    """Scaling and kept outputs from the training samples only (EMO's variance filter for genes)."""
    n_out = len(data.outputs)
    if data.kind != "regression":
        return FoldTargets(np.zeros(n_out, np.float32), np.ones(n_out, np.float32), np.ones(n_out, bool))
    Y = data.train_targets[train].astype(np.float64)
    mean, std = Y.mean(0), Y.std(0)
    mask = np.ones(n_out, bool)
    if data.variance_filter:  # EMO: genes with training variance > min_variance (across samples)
        units = np.unique(data.unit_of[train])
        mask = data.unit_targets[units].var(0, ddof=1) > min_variance if len(units) > 1 else mask
    if not standardize:
        mean, std = np.zeros(n_out), np.ones(n_out)
    std = np.where(std > 1e-6, std, 1.0)
    return FoldTargets(mean.astype(np.float32), std.astype(np.float32), mask)


def loss(kind: str, out, target, ft: FoldTargets):
    """Training loss of a batch: out (B, n_out) logits/outputs, target (B, n_out or 1) with NaN = no label."""
    import torch
    import torch.nn.functional as F

    out = out.float()
    if kind == "regression":
        mean = torch.as_tensor(ft.mean, device=out.device)
        std = torch.as_tensor(ft.std, device=out.device)
        cols = torch.as_tensor(np.flatnonzero(ft.mask), device=out.device)
        z = (target - mean) / std
        return F.mse_loss(out[:, cols], z[:, cols])
    if kind == "binary":
        ok = ~torch.isnan(target)
        if not ok.any():
            return out.sum() * 0.0
        return F.binary_cross_entropy_with_logits(out[ok], target[ok])
    ok = ~torch.isnan(target[:, 0])
    if not ok.any():
        return out.sum() * 0.0
    return F.cross_entropy(out[ok], target[ok, 0].long())


def activate(kind: str, out, ft: FoldTargets) -> np.ndarray:
    """Predictions in target units (regression) or probabilities, as float64 numpy (B, n_out)."""
    import torch

    out = out.float()
    if kind == "regression":
        return (out.cpu().numpy().astype(np.float64) * ft.std + ft.mean)
    if kind == "binary":
        return torch.sigmoid(out).cpu().numpy().astype(np.float64)
    return torch.softmax(out, 1).cpu().numpy().astype(np.float64)


def output_bias(kind: str, data: TaskData, train: np.ndarray, ft: FoldTargets) -> np.ndarray:
    """Initial head bias: 0 in standardised units (= mean), log-odds / log-prior of the training labels."""
    n_out = len(data.outputs)
    T = data.train_targets[train]
    if kind == "regression":
        return ((T.mean(0) - ft.mean) / ft.std).astype(np.float32) if len(T) else np.zeros(n_out, np.float32)
    if kind == "binary":
        p = np.clip(np.nanmean(T, 0), 0.02, 0.98)
        return np.log(p / (1 - p)).astype(np.float32)
    counts = np.bincount(T[~np.isnan(T[:, 0]), 0].astype(int), minlength=n_out) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)
