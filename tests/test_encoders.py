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
