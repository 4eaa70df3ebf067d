"""Small torch helpers shared by the trained heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while training small nets on the CPU (sigmoid/weight-decay
    training drifts into denormals, which made steps ~6x slower here); restores the setting after."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
