"""One encoder factory over timm: any model name, hf-hub names, truncation at a named stage.

Weights: 'imagenet' (timm's pretrained tag), a local file (.safetensors, .pth, .pt, .bin), or
'none' (random init, seeded). Input transforms come from the model's own data config.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from hefeat.errors import HefeatError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that defines an encoder's output: its id derives from this."""

    name: str
    layer: str | None
    weights: str
    weights_digest: str
    dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float = 1.0
    fixed_input_size: bool = False

    def to_dict(self) -> dict:
        """Plain-dict form (for provenance and ids)."""
        return asdict(self)


def _state_digest(model) -> str:
    """sha256 over the model's tensors (names, shapes, bytes), independent of where weights came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a weights file (.safetensors via safetensors, else torch.load with weights_only)."""
    import torch

    p = Path(path)
    if not p.exists():
        raise HefeatError(f"Weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise HefeatError(f"Cannot read weights file {p.name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise HefeatError(f"Weights file {p.name} holds no state dict")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}


def _suggest(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."


def _load_into(model, sd: dict, source: str) -> None:
    """Load `sd` into `model`; classifier keys may be absent; anything else must match."""
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    head = ("fc.", "classifier.", "head.", "last_linear.")
    unexpected = [k for k in unexpected if not k.startswith(head)]
    missing = [k for k in own if k not in sd]
    if unexpected or missing:
        raise HefeatError(
            f"Weights {source} do not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). Is it the right encoder?"
        )
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise HefeatError(f"Weights {source} have wrong shapes for {bad[:3]}: is it the right encoder?")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def _norm_key(k: str) -> str:
    return k.replace("_", ".")


class Encoder:
    """A frozen feature extractor: uint8 NHWC batches in, (B, dim) features out."""

    def __init__(self, net, config: EncoderConfig, truncated: bool):
        self.net = net
        self.config = config
        self.truncated = truncated
        self.provenance: dict | None = None  # flat str/int facts about where the weights came from (a fine-tuning job)

    def to(self, *args, **kwargs) -> Encoder:
        """Move or re-format the network (torch.nn.Module.to semantics); returns self."""
        self.net.to(*args, **kwargs)
        return self

    def __call__(self, x):
        """x: float tensor (B, 3, H, W), already normalised. Returns (B, dim)."""
        out = self.net(x)
        if self.truncated:
            out = out[-1].mean(dim=(2, 3))
        return out


def create_encoder(name: str, *, weights: str | None = None, layer: str | None = None, seed: int = 0,
                   store=None) -> Encoder:
    """Build an encoder: timm model `name`, weights 'imagenet' | path | 'none', optional stage `layer`.

    'finetuned:<job_id>[:<fold>]' is the backbone of a fine-tuning job in `store` (hefeat.finetune).
    Unknown names, missing/ill-fitting weight files and an unreachable hub raise HefeatError.
    """
    import timm
    import torch

    if name.startswith("finetuned:"):
        from hefeat.finetune.register import finetuned_encoder

        return finetuned_encoder(store, name, layer=layer, seed=seed)

    weights = weights or "imagenet"
    is_hub = name.startswith("hf-hub:")
    if not is_hub and not timm.is_model(name):
        raise HefeatError(f"Unknown encoder {name!r}.{_suggest(name)}")
    local = weights not in ("imagenet", "none")
    if local and not Path(weights).exists():
        raise HefeatError(f"Weights file not found: {weights} (use --weights imagenet, none, or a file path)")
    torch.manual_seed(seed)
    try:
        full = timm.create_model(name, pretrained=(weights == "imagenet") or (is_hub and weights != "none"), num_classes=0)
    except HefeatError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if weights == "imagenet" or is_hub:
            raise HefeatError(
                f"Could not get pretrained weights for {name} ({msg}). The model hub may be unreachable "
                f"(offline?). Pass --weights path/to/file.safetensors, or --weights none for random init."
            ) from None
        raise HefeatError(f"Cannot build encoder {name}: {msg}") from None
    if local:
        _load_into(full, load_state_dict_file(weights), Path(weights).name)
    full.eval()
    data_cfg = timm.data.resolve_model_data_config(full)
    fixed_size = bool((getattr(full, "pretrained_cfg", None) or {}).get("fixed_input_size", False))
    truncated = layer is not None
    if truncated:
        net = timm.create_model(name, pretrained=False, features_only=True)
        names = [i["module"] for i in net.feature_info.info]
        match = [i for i, m in enumerate(names) if m == layer or m.split(".")[-1] == layer]
        if not match:
            raise HefeatError(f"Encoder {name} has no stage {layer!r}; stages: {', '.join(names)}")
        idx = match[0]
        net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(idx,))
        src = {_norm_key(k): v for k, v in full.state_dict().items()}
        net.load_state_dict({k: src[_norm_key(k)] for k in net.state_dict()}, strict=True)
        dim = int(net.feature_info.channels()[-1])
        del full
    else:
        net = full
        dim = int(full.num_features)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _, h, w = data_cfg["input_size"]
    config = EncoderConfig(
        name=name, layer=layer, weights=str(Path(weights).name) if local else weights,
        weights_digest=_state_digest(net), dim=dim, input_size=(int(h), int(w)),
        mean=tuple(float(v) for v in data_cfg["mean"]), std=tuple(float(v) for v in data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bilinear")),
        crop_pct=float(data_cfg.get("crop_pct") or 1.0),
        fixed_input_size=fixed_size,
    )
    return Encoder(net, config, truncated)


def list_stages(name: str) -> list[str]:
    """Stage names usable as `layer` for encoder `name`."""
    import timm

    return [i["module"] for i in timm.create_model(name, pretrained=False, features_only=True).feature_info.info]
