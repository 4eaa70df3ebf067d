"""One process or many: torchrun's environment decides, the same command runs on a CPU, a GPU or N GPUs.

`torchrun --nproc_per_node N -m hefeat.cli finetune run ...` sets RANK/WORLD_SIZE/LOCAL_RANK; then
each process joins the group (NCCL on GPUs, gloo on CPUs), takes GPU LOCAL_RANK, and wraps the model
in DistributedDataParallel. Without those variables it is a plain single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hefeat.errors import HefeatError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank, device and backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes shared files (rank 0)."""
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=process_device(device, 0))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = process_device(device, local)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(int(dev.split(":")[1]))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, device=dev, backend=backend)


def process_device(device: str | None, local_rank: int) -> str:
    """The torch device of the process with this local rank: 'cpu', or 'cuda:N' (auto: CUDA when visible)."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise HefeatError("--device cuda: no CUDA device is visible to this process")
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    if not (device == "cpu" or device.startswith("cuda:")):
        raise HefeatError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return device


def teardown(d: Dist) -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def gather(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    """Wait for every rank."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def wrap(model, d: Dist):
    """DistributedDataParallel around `model` when there are several processes."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)


def unwrap(model):
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)
