"""Atomic checkpoints with everything a bitwise resume needs, loaded without unpickling code.

A checkpoint holds the model, optimiser, scheduler and grad-scaler states, the epoch and the step
within it (the data order is a function of those), early-stopping state, the metrics history and
the RNG states of torch (CPU and CUDA), NumPy and Python of every rank. It is written to a temporary
name, fsynced and renamed, so a crash leaves the previous checkpoint or the new one, never half of
one; `torch.load(weights_only=True)` reads it back (only tensors and plain containers inside).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from hefeat.errors import HefeatError
from hefeat.finetune.faults import fault_point
from hefeat.store.atomic import atomic_path


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain lists."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [int(py_version), list(py_state), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore what capture_rng() returned."""
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, obj: dict, *, step: int | None = None) -> None:
    """torch.save to a temporary sibling, fsync, rename (fault points around the rename)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        fault_point("ckpt-tmp", step)
    fault_point("ckpt-renamed", step)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path` (on the CPU; load_state_dict moves it), or None if there is none."""
    import torch

    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HefeatError(f"Checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "delete it to restart that fold from its previous checkpoint or from scratch") from None
