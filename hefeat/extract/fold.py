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

Only pairs that are exactly a torch Conv2d (or timm's Conv2dSame) whose output feeds nothing but a BatchNorm2d (or timm's
BatchNormAct2d, whose dropout and activation stay) are folded, found on a torch.fx trace. Convolutions
with their own forward (timm's StdConv2d standardises its weight; scaling it first would be wrong) and
modules called at more than one place are left alone; a network fx cannot trace is not folded.
"""

from __future__ import annotations

from collections import Counter


def _types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(convolutions, norms) whose pairs fold: exact types, each a leaf of the trace."""
    import torch
    from timm.layers import BatchNormAct2d, Conv2dSame

    # Conv2dSame pads, then convolves with its weight and bias: folding into it is exact as for Conv2d
    return (torch.nn.Conv2d, Conv2dSame), (torch.nn.BatchNorm2d, BatchNormAct2d)


def _foldable_norm(m) -> bool:
    return (type(m) in _types()[1] and not m.training
            and m.running_mean is not None and m.running_var is not None)


def foldable_pairs(net) -> list[tuple[str, str]]:
    """(conv, norm) module names of `net` whose eval-mode norm can be folded into the conv, in graph order."""
    from torch import fx

    mods = dict(net.named_modules())
    if not any(_foldable_norm(m) for m in mods.values()):
        return []
    convs, norms = _types()

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname: str) -> bool:  # timm's BatchNormAct2d and Conv2dSame stay one call
            return type(m) in convs + norms or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(net)
    except Exception:  # noqa: BLE001  (data-dependent control flow etc.: such a network runs as built)
        return []
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
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
    import torch

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
            parent_name, _, attr = norm_name.rpartition(".")
            parent = mods[parent_name] if parent_name else net
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, attr, torch.nn.Sequential(*rest) if rest else torch.nn.Identity())
    return len(pairs)
