"""One encoder factory over timm: presets (pathology foundation models), any timm name, hf-hub names,
truncation at a named stage, and registered sources (e.g. fine-tuned jobs).

Weights: 'imagenet' (timm's pretrained tag), a preset's hub repository or packaged file, a local
file (.safetensors, .pth, .pt, .bin), or 'none' (random init, seeded, with a loud warning). Input
transforms come from the preset or the model's own data config.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import warnings
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
    pooling: str = "default"
    train_mpp: float | None = None  # µm/px the model was trained at, where known (presets)

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

    from hefeat.extract.presets import PRESETS

    close = difflib.get_close_matches(name, [*PRESETS, *timm.list_models()], n=5, cutoff=0.6)
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


class RandomWeightsWarning(UserWarning):
    """Features from random weights carry no meaning beyond tests and plumbing checks."""


class Encoder:
    """A frozen feature extractor: normalised float batches in, (B, dim) features out."""

    def __init__(self, net, config: EncoderConfig, truncated: bool, pooling: str = "default"):
        self.net = net
        self.config = config
        self.truncated = truncated
        self.pooling = pooling
        self.provenance: dict | None = None  # flat str/int facts about where the weights came from (a fine-tuning job)

    def to(self, *args, **kwargs) -> Encoder:
        """Move or re-format the network (torch.nn.Module.to semantics); returns self."""
        self.net.to(*args, **kwargs)
        return self

    def __call__(self, x):
        """x: float tensor (B, 3, H, W), already normalised. Returns (B, dim)."""
        import torch

        if self.pooling == "cls+mean":  # class token ++ mean of patch tokens (register tokens excluded)
            tokens = self.net.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, self.net.num_prefix_tokens:].mean(1)], dim=-1)
        out = self.net(x)
        if self.truncated:
            out = out[-1].mean(dim=(2, 3))
        return out


def _warn_random(name: str) -> None:
    warnings.warn(RandomWeightsWarning(
        f"--weights none: {name} has RANDOM weights (seeded). Its features mean nothing biologically: every tile "
        "sits near every other. Use it for tests and plumbing only."), stacklevel=3)


def create_encoder(name: str, *, weights: str | None = None, layer: str | None = None, seed: int = 0,
                   store=None, **model_kwargs) -> Encoder:
    """Build an encoder: a preset (see hefeat.extract.presets), a timm model name, or a fine-tuned job.

    weights: 'imagenet' (timm's pretrained tag) | 'hub' (a preset's hub repository) | 'bundled' (a
    preset's packaged file) | a local file | 'none' (random init, seeded; warns). `layer` truncates
    a timm CNN at that stage. `model_kwargs` go to timm (tests build presets scaled down this way).
    'finetuned:<job_id>[:<fold>]' is the backbone of a fine-tuning job in `store` (hefeat.finetune).
    Unknown names, missing/ill-fitting weight files and an unreachable or gated hub raise HefeatError.
    """
    from hefeat.plugins import encoder_scheme

    factory = encoder_scheme(name)  # 'finetuned:<job>' (hefeat.finetune.register), named in hefeat.plugins
    if factory is not None:
        return factory(store, name, layer=layer, seed=seed)
    from hefeat.extract.presets import PRESETS

    if name in PRESETS:
        return _create_preset(PRESETS[name], weights=weights, layer=layer, seed=seed, overrides=model_kwargs)
    return _create_timm(name, weights=weights, layer=layer, seed=seed, model_kwargs=model_kwargs)


def _create_timm(name: str, *, weights, layer, seed, model_kwargs) -> Encoder:
    import timm
    import torch

    weights = weights or "imagenet"
    is_hub = name.startswith("hf-hub:")
    if not is_hub and not timm.is_model(name):
        raise HefeatError(f"Unknown encoder {name!r}.{_suggest(name)}")
    local = weights not in ("imagenet", "none")
    if local and not Path(weights).exists():
        raise HefeatError(f"Weights file not found: {weights} (use --weights imagenet, none, or a file path)")
    if weights == "none":
        _warn_random(name)
    torch.manual_seed(seed)
    try:
        full = timm.create_model(name, pretrained=(weights == "imagenet") or (is_hub and weights != "none"), num_classes=0,
                                 **model_kwargs)
    except HefeatError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if weights == "imagenet" or is_hub:
            raise HefeatError(
                f"Could not get pretrained weights for {name} ({msg}). The model hub may be unreachable "
                f"(offline?). Pass --weights path/to/file.safetensors, or --weights none for random init, or use "
                f"--encoder efficientnet-lite0 (ImageNet weights installed with hefeat)."
            ) from None
        raise HefeatError(f"Cannot build encoder {name}: {msg}") from None
    if local:
        _load_into(full, load_state_dict_file(weights), Path(weights).name)
    full.eval()
    data_cfg = timm.data.resolve_model_data_config(full)
    fixed_size = bool((getattr(full, "pretrained_cfg", None) or {}).get("fixed_input_size", False))
    truncated = layer is not None
    if truncated:
        with _on_meta():  # only the stage names are read: no weights allocated or initialised
            probe = timm.create_model(name, pretrained=False, features_only=True, **model_kwargs)
        names = [i["module"] for i in probe.feature_info.info]
        match = [i for i, m in enumerate(names) if m == layer or m.split(".")[-1] == layer]
        if not match:
            raise HefeatError(f"Encoder {name} has no stage {layer!r}; stages: {', '.join(names)}")
        net = _truncated(name, match[0], model_kwargs)
        src = {_norm_key(k): v for k, v in full.state_dict().items()}
        # assign: the truncated network takes the full model's tensors themselves (the full model is dropped
        # below), where copying them into fresh storage cost ~0.25 s for ResNet-50's layer3
        net.load_state_dict({k: src[_norm_key(k)] for k in net.state_dict()}, strict=True, assign=True)
        dim = int(net.feature_info.channels()[-1])
        del full
    else:
        net = full
        dim = int(full.num_features)
    _, h, w = data_cfg["input_size"]
    return _finish(net, name=name, layer=layer, weights=str(Path(weights).name) if local else weights, dim=dim,
                   input_size=(int(h), int(w)), mean=data_cfg["mean"], std=data_cfg["std"],
                   interpolation=str(data_cfg.get("interpolation", "bilinear")),
                   crop_pct=float(data_cfg.get("crop_pct") or 1.0), fixed=fixed_size, truncated=truncated)


def _truncated(name: str, idx: int, model_kwargs: dict):
    """The network up to stage `idx`, its weights to be loaded (load_state_dict(assign=True)) from the full model.

    Built on the meta device, without storage: the full model's state dict supplies every parameter
    and persistent buffer; built on the CPU where it has buffers a state dict does not carry.
    """
    import timm

    with _on_meta():
        net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(idx,), **model_kwargs)
    if {k for k, _ in net.named_buffers()} <= set(net.state_dict()):
        return net
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=(idx,), **model_kwargs)


# In-place initialisers (and the arithmetic of timm's trunc_normal_) that a model's __init__ runs on its weights:
# on a meta tensor (no storage) they change nothing, but torch runs some of them (normal_, uniform_) through
# torch._refs, which imports torch._dynamo (~1 s) to decorate them.
_META_INIT_OPS = frozenset({"normal_", "uniform_", "zero_", "fill_", "erfinv_", "mul_", "add_", "clamp_"})


@contextlib.contextmanager
def _on_meta():
    """Build modules on the meta device, their weights' in-place initialisation skipped (it has nothing to write)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipMetaInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _META_INIT_OPS and args and isinstance(args[0], torch.Tensor) \
                    and args[0].is_meta:
                return args[0]
            return func(*args, **(kwargs or {}))

    with torch.device("meta"), SkipMetaInit():
        yield


def _finish(net, *, name, layer, weights, dim, input_size, mean, std, interpolation, crop_pct, fixed, truncated,
            pooling: str = "default", mpp: float | None = None) -> Encoder:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    config = EncoderConfig(
        name=name, layer=layer, weights=weights, weights_digest=_state_digest(net), dim=dim,
        input_size=input_size, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        interpolation=interpolation, crop_pct=crop_pct, fixed_input_size=fixed, pooling=pooling, train_mpp=mpp,
    )
    return Encoder(net, config, truncated, pooling)


def _gated_error(p, msg: str) -> HefeatError:
    gate = ("It is gated: accept its licence on its Hugging Face page while logged in, then run "
            "`huggingface-cli login` or set HF_TOKEN. " if p.gated else "")
    return HefeatError(
        f"Could not download {p.name} weights from the hub repository {p.hub} ({msg}). {gate}Offline, download the "
        f"weights file once and pass --weights path/to/file (.safetensors/.bin/.pth). Licence: {p.licence}."
    )


def _preset_weights(p, weights: str | None) -> str:
    """A preset's --weights with its defaults applied: 'bundled' when a package ships them, else 'hub'."""
    if weights in (None, "imagenet"):
        return "bundled" if p.package_weights else "hub"
    return weights


def recorded_weights(name: str, weights: str | None) -> str | None:
    """The weights label an extraction with this encoder records, where it follows from the names alone
    (a preset's bundled or hub weights); other values are returned as given."""
    from hefeat.extract.presets import PRESETS

    p = PRESETS.get(name)
    if p is None:
        return weights
    w = _preset_weights(p, weights)
    if w == "bundled" and p.package_weights:
        return f"package:{p.package_weights[0]}"
    if w == "hub" and p.hub:
        return f"hub:{p.hub}"
    return w


def _create_preset(p, *, weights, layer, seed, overrides: dict) -> Encoder:
    import timm
    import torch

    from hefeat.extract.presets import KEY_MAPS, package_weights_path, resolve_kwargs

    if layer is not None:
        raise HefeatError(f"{p.name} is a preset with its published pooling ({p.pooling}); --layer applies to timm "
                          "CNN names such as resnet50")
    weights = _preset_weights(p, weights)
    kwargs = {**resolve_kwargs(p.kwargs), **overrides, "num_classes": 0}
    torch.manual_seed(seed)
    key_map = KEY_MAPS.get(p.key_map) if p.key_map else None
    if weights == "hub" and p.hub and p.hub_format == "timm":
        try:
            net = timm.create_model(f"hf-hub:{p.hub}", pretrained=True, **kwargs)
        except Exception as e:
            raise _gated_error(p, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        label = f"hub:{p.hub}"
    else:
        try:
            net = timm.create_model(p.architecture, pretrained=False, **kwargs)
        except Exception as e:
            raise HefeatError(f"Cannot build {p.name} ({p.architecture}): {type(e).__name__}: {e}") from None
        if weights == "none":
            _warn_random(p.name)
            label = "none"
        else:
            if weights == "hub":
                if not p.hub:
                    raise HefeatError(f"{p.name} has no hub repository; pass --weights FILE")
                path, label = _hub_file(p), f"hub:{p.hub}"
            elif weights == "bundled":
                if not p.package_weights:
                    raise HefeatError(f"{p.name} ships no weights in a package; use --weights hub or a file")
                path, label = package_weights_path(p), f"package:{p.package_weights[0]}"
            else:
                path, label = Path(weights), Path(weights).name
            sd = load_state_dict_file(path)
            if key_map and not set(net.state_dict()) <= set(sd):
                sd = key_map(sd)
            _load_into(net, sd, label)
    n_out = int(net.num_features) * (2 if p.pooling == "cls+mean" else 1)
    if n_out != p.dim and not overrides:
        raise HefeatError(f"preset {p.name} declares {p.dim}-d but builds {n_out}-d; the preset is wrong")
    size = int(kwargs.get("img_size", p.input_size))
    return _finish(net, name=p.name, layer=None, weights=label, dim=n_out, input_size=(size, size), mean=p.mean,
                   std=p.std, interpolation=p.interpolation, crop_pct=p.crop_pct,
                   fixed=not kwargs.get("dynamic_img_size", False) and p.architecture.startswith("vit"),
                   truncated=False, pooling=p.pooling, mpp=p.mpp)


def _hub_file(p) -> Path:
    """Download a preset's weights file (transformers layout) from its hub repository."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(p.hub, "model.safetensors"))
    except Exception as e:
        raise _gated_error(p, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def list_stages(name: str) -> list[str]:
    """Stage names usable as `layer` for encoder `name`."""
    import timm

    return [i["module"] for i in timm.create_model(name, pretrained=False, features_only=True).feature_info.info]


def describe_encoders() -> list[dict]:
    """Every preset with its architecture, dim, input, µm/px, pooling, weights source, gating and licence."""
    from hefeat.extract.presets import PRESETS

    return [p.describe() for p in PRESETS.values()]
