"""Fold inference-mode BatchNorm into the convolution before it (one pass less per normalised conv).

In eval mode a BatchNorm is an affine map per channel, y = (x - mean) * gamma / sqrt(var + eps) + beta,
so after a convolution it can be merged into that convolution's weights and bias (Ioffe & Szegedy
2015; the folding is the one of Jacob et al. 2018, "Quantization and training of neural networks for
efficient integer-arithmetic-only inference", section 3.2). The network computes the same function;
what changes is the rounding: ~1e-7 relative at fp32, within bf16's own error at bf16 (measured in
benchmarks/README). On a ResNet-50 the BatchNorm passes are a fifth of a CPU forward, which is
memory-bound on them rather than on the convolutions.

Because the rounding changes, folding is part of what an extraction is: `--precision auto` decides it
once per extraction with the precision and records it (hefeat.extract.plan.choose_precision); an
extraction recorded before folding existed keeps running unfolded.

Only pairs that are exactly a torch Conv2d (or timm's Conv2dSame) whose output feeds nothing but a
BatchNorm2d (or timm's BatchNormAct2d, whose dropout and activation stay) are folded, found on a torch.fx
trace. Convolutions with their own forward (timm's StdConv2d standardises its weight; scaling it first
would be wrong) and modules called at more than one place are left alone; a network fx cannot trace is
not folded.

On the CPU a folded convolution followed only by a ReLU then runs as one oneDNN call with the ReLU as
its post-op (`fuse_conv_relu`): another memory pass saved. Unlike folding this changes no bit, and that
is checked rather than assumed (below).

The last convolution of a plain timm ResNet block, its residual add and its ReLU run as one oneDNN call too
(`fuse_residual_relu`: the add and the ReLU as post-ops). At bf16, PyTorch's separate add and ReLU over the
block's full-size output were a third of a ResNet-50 forward on the CPU: fused, ResNet-50 up to layer3 runs
1.4-1.6x the tiles/s (benchmarks/README, round 17; no change at fp32, where those passes are cheap). This one
rounds once where the separate calls round the convolution's output and then the sum (at bf16, one unit in
the last place of a block's output), so like folding it is part of what an extraction is: decided by
`--precision auto` and recorded (fuse_residual). Each block checks its fused output against its own forward
on the first rows of every new tile shape, within RESIDUAL_TOL of the largest value (rounding, not a wrong
op), and runs as built for that shape where it is not.

The conv+ReLU fusion's check: when a layer meets a new tile shape (channels, size, dtype, memory
format, autocast), the first CHECK_ROWS rows also run as two calls, and the fused call is kept only
where the two are equal (else that layer runs as two calls for that shape). Checking a few rows rather
than the batch keeps the check at ~0.2 CPU-s per process instead of a second forward of the first batch
(~1 CPU-s at ResNet-50 layer3, batch 64), and it relies on what the extraction already relies on: a row's
features do not depend on its batch (tests/test_extract.py, batches across slides).
"""

from __future__ import annotations

import functools
from collections import Counter

import torch


@functools.cache
def _types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(convolutions, norms) whose pairs fold: exact types, each a leaf of the trace."""
    from timm.layers import BatchNormAct2d, Conv2dSame

    # Conv2dSame pads, then convolves with its weight and bias: folding into it is exact as for Conv2d
    return (torch.nn.Conv2d, Conv2dSame), (torch.nn.BatchNorm2d, BatchNormAct2d)


def _foldable_norm(m) -> bool:
    return (type(m) in _types()[1] and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _trace(net, leaves: tuple[type, ...]):
    """The torch.fx graph of `net` with `leaves` kept as single calls, or None where fx cannot trace it."""
    from torch import fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname: str) -> bool:
            return type(m) in leaves or super().is_leaf_module(m, qualname)

    try:
        return _Tracer().trace(net)
    except Exception:  # noqa: BLE001  (data-dependent control flow etc.: such a network runs as built)
        return None


def _module_calls(graph) -> Counter:
    """How many times the graph calls each submodule (one called twice cannot be rewritten for one call site)."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def _replace(net, mods: dict, name: str, new) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(mods[parent_name] if parent_name else net, attr, new)


def foldable_pairs(net) -> list[tuple[str, str]]:
    """(conv, norm) module names of `net` whose eval-mode norm can be folded into the conv, in graph order."""
    from torch import fx

    mods = dict(net.named_modules())
    if not any(_foldable_norm(m) for m in mods.values()):
        return []
    convs, norms = _types()
    graph = _trace(net, convs + norms)  # timm's BatchNormAct2d and Conv2dSame stay one call
    if graph is None:
        return []
    calls = _module_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_norm(mods.get(node.target)) or len(node.args) != 1:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        if type(mods.get(prev.target)) not in convs or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((prev.target, node.target))
    return pairs


def fold_batchnorm(net) -> int:
    """Fold every foldable BatchNorm of an eval-mode `net` into its convolution, in place; returns how many."""
    mods = dict(net.named_modules())
    pairs = foldable_pairs(net)
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv, bn = mods[conv_name], mods[norm_name]
            scale = bn.running_var.double().add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.double()
            w = conv.weight
            conv.weight.copy_((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
            bias = shift if conv.bias is None else conv.bias.double() * scale + shift
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(bias.to(w.dtype), requires_grad=False)
            else:
                conv.bias.copy_(bias.to(w.dtype))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            _replace(net, mods, norm_name, torch.nn.Sequential(*rest) if rest else torch.nn.Identity())
    return len(pairs)


def fold_for_inference(net) -> bool:
    """Fold `net`'s BatchNorms (eval mode, in place) and, on the CPU, fuse the folded conv+ReLU pairs; True if any
    BatchNorm was folded (what an extraction records as fold_bn)."""
    net.eval()
    folded = fold_batchnorm(net) > 0
    if folded:
        fuse_conv_relu(net)
    return folded


def prepare_network(net, *, fold_bn: bool, fuse_residual: bool) -> tuple[bool, bool]:
    """`net` as an extraction decided to run it: BatchNorms folded and conv+ReLU fused where fold_bn, its ResNet
    blocks' residuals fused too where fuse_residual (only on a folded network); returns what was applied."""
    folded = fold_for_inference(net) if fold_bn else False
    return folded, folded and fuse_residual and fuse_residual_relu(net) > 0


def _autocast_dtype():
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


CHECK_ROWS = 4  # rows of a batch that also run as two calls when their shape is new to a fused layer


def _run_checked(m, x, plain, same):
    """m._fused(x) where it was checked against `plain` for this tile shape (its first CHECK_ROWS rows, compared by
    `same`); `plain` where it differed or the op refused, for that shape only (calibration tries layouts and dtypes
    the op may refuse: the one chosen still runs fused); `plain` always once m.fused_ok is False."""
    if not m.fused_ok:
        return plain(x)
    key = (tuple(x.shape[1:]), x.dtype, x.stride()[1:], _autocast_dtype())  # per tile: any batch size
    ok = m.checked.get(key)
    if ok:
        return m._fused(x)
    if ok is None:
        try:
            out = m._fused(x)
        except RuntimeError:  # the op refuses this input
            out = None
        r = min(len(x), CHECK_ROWS)
        ok = m.checked[key] = out is not None and bool(same(out[:r], plain(x[:r])))
        if ok:
            return out
    return plain(x)


class ConvReLU2d(torch.nn.Conv2d):
    """Conv2d then ReLU as one oneDNN call on the CPU, checked equal to the two calls for each new tile shape."""

    fused_ok = True  # False: the layer runs as two calls (unfuse_conv_relu)

    def forward(self, x):
        return _run_checked(self, x, self._plain, torch.equal)

    def _plain(self, x):
        return torch.nn.functional.relu(self._conv_forward(x, self.weight, self.bias))

    def _fused(self, x):
        w, b, dt = self.weight, self.bias, _autocast_dtype()
        if dt is not None:  # what autocast does for conv2d; the oneDNN op is outside its lists
            x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, "relu", [], "")


def fuse_conv_relu(net) -> int:
    """On the CPU, run each Conv2d whose output only feeds a ReLU (through identities) as one call; returns how many."""
    from torch import fx

    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return 0
    mods = dict(net.named_modules())
    graph = _trace(net, ())
    if graph is None:
        return 0
    calls = _module_calls(graph)

    def single(node, types) -> bool:
        return (isinstance(node, fx.Node) and node.op == "call_module" and type(mods.get(node.target)) in types
                and calls[node.target] == 1)

    n = 0
    for node in graph.nodes:
        if not single(node, (torch.nn.ReLU,)) or len(node.args) != 1:
            continue
        prev = node.args[0]
        while single(prev, (torch.nn.Identity,)) and len(prev.users) == 1:
            prev = prev.args[0]
        if not single(prev, (torch.nn.Conv2d,)) or len(prev.users) != 1:
            continue
        conv = mods[prev.target]
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.weight.device.type != "cpu":
            continue
        fused = ConvReLU2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                           bias=conv.bias is not None, device="meta")  # takes the conv's own tensors below
        fused.weight, fused.bias, fused.checked = conv.weight, conv.bias, {}
        fused.eval()
        _replace(net, mods, prev.target, fused)
        _replace(net, mods, node.target, torch.nn.Identity())
        n += 1
    return n


def unfuse_conv_relu(net) -> int:
    """Run every fused conv+ReLU (and residual block) of `net` as separate calls again (before torch.compile, which
    fuses by itself); returns how many."""
    fused = [m for m in net.modules() if isinstance(m, (ConvReLU2d, _ResidualReLU))]
    for m in fused:
        m.fused_ok = False
    return len(fused)


RESIDUAL_TOL = 2.0 ** -6  # of a block's largest output value: a few bf16 roundings, far below any wrong operation


def _close(out, ref) -> bool:
    """Whether a fused block's output is its own forward's up to rounding (same shape and dtype, all finite)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    a, b = out.float(), ref.float()
    if not bool(torch.isfinite(a).all()):
        return False
    return float((a - b).abs().max()) <= RESIDUAL_TOL * float(b.abs().max())


class _ResidualReLU:
    """A timm ResNet block whose last conv, residual add and ReLU run as one oneDNN call (the add and the ReLU as
    post-ops), checked against the block's own forward on the first rows of each new tile shape."""

    fused_ok = True  # False: the block runs as built (unfuse_conv_relu)

    def forward(self, x):
        return _run_checked(self, x, super().forward, _close)

    def _last(self, conv, y, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        w, b, dt = conv.weight, conv.bias, _autocast_dtype()
        if dt is not None:  # what autocast does for conv2d and the add; the oneDNN op is outside its lists
            y, w, b, shortcut = y.to(dt), w.to(dt), None if b is None else b.to(dt), shortcut.to(dt)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            y, shortcut, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "add", 1.0, "relu", [], "")


def _bottleneck_fused(self, x):
    y = self.act1(self.bn1(self.conv1(x)))
    y = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(y)))))
    return self._last(self.conv3, y, x)


def _basic_fused(self, x):
    y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return self._last(self.conv2, y, x)


# timm block class -> (its last conv, the norm after it, its final activation), and its forward with those fused
_RESIDUAL = {"Bottleneck": (("conv3", "bn3", "act3"), _bottleneck_fused),
             "BasicBlock": (("conv2", "bn2", "act2"), _basic_fused)}


@functools.cache
def _residual_class(name: str) -> type:
    """The fused subclass of timm's block `name`, found by pickle as this module's attribute (PEP 562 below)."""
    import timm.models.resnet as resnet

    cls = type(f"ResidualReLU{name}", (_ResidualReLU, getattr(resnet, name)),
               {"_fused": _RESIDUAL[name][1], "__module__": __name__})
    cls.__qualname__ = cls.__name__
    return cls


def __getattr__(attr: str):
    base = attr.removeprefix("ResidualReLU")
    if base != attr and base in _RESIDUAL:
        return _residual_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def fuse_residual_relu(net) -> int:
    """On the CPU, run the last conv, residual add and ReLU of each plain timm ResNet block (its last norm folded
    away, no squeeze-excitation, no drop path) as one call, in place; returns how many blocks."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if not torch.backends.mkldnn.is_available() or op is None or not hasattr(op, "binary"):
        return 0
    import timm.models.resnet as resnet

    n = 0
    for m in net.modules():
        name = type(m).__name__
        if name not in _RESIDUAL or type(m) is not getattr(resnet, name, None):
            continue
        conv, norm, act = (getattr(m, a) for a in _RESIDUAL[name][0])
        if (type(conv) is not torch.nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or conv.weight.device.type != "cpu" or type(norm) is not torch.nn.Identity
                or type(act) is not torch.nn.ReLU or m.se is not None or m.drop_path is not None):
            continue
        m.__class__ = _residual_class(name)
        m.checked = {}  # tile shape -> fused output checked equal (True) or not (False)
        n += 1
    return n
