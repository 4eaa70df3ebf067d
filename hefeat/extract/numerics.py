"""How a chosen precision runs: autocast for bf16/fp16, IEEE fp32 (no TF32 on CUDA), the memory format."""

from __future__ import annotations

import contextlib

from hefeat.errors import HefeatError

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: str, precision: str):
    """torch.autocast for bf16/fp16 on the device's type; for fp32, IEEE fp32 (no TF32 on CUDA)."""
    import torch

    if precision not in PRECISIONS:
        raise HefeatError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return ieee_fp32() if device.startswith("cuda") else contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@contextlib.contextmanager
def ieee_fp32():
    """CUDA convolutions and matmuls in IEEE fp32 inside the block (flags restored after).

    PyTorch runs cuDNN convolutions in TF32 by default (a 10-bit mantissa, ~1e-3 relative): a run recorded as
    fp32, and the fp32 reference that calibration measures every other precision's error against, would be
    neither. TF32 is not a candidate of its own: bf16/fp16 are faster on every GPU that has it.
    """
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = old


def apply_memory_format(model, x, channels_last: bool):
    """Model and 4-D input in channels-last (NHWC) or contiguous (NCHW) memory format."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x
