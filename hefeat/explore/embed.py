"""Embed an image file with the exact encoder of an extraction (for query-by-image)."""

from __future__ import annotations

import numpy as np

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store


def embed_image(store: Store, extraction_id: str, path: str) -> np.ndarray:
    """Embedding (dim,) of an RGB image, resized to the tiling's patch size, with the extraction's encoder."""
    from pathlib import Path

    import torch
    from PIL import Image

    from hefeat.extract.compute import DeviceTransform, InputPlan, embed_batch
    from hefeat.extract.encoders import create_encoder
    from hefeat.extract.fold import prepare_network

    ext = store.extraction(extraction_id)
    if ext.get("imported"):
        raise HefeatError(f"Extraction {extraction_id} was imported; hefeat cannot re-create its encoder to embed images")
    if not Path(path).exists():
        raise HefeatError(f"Image not found: {path}")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise HefeatError(f"Cannot read image {path}: {e}") from None
    # The extraction's own input plan (crop / resize / native) and stain reference, so the image is
    # embedded exactly as its tiles were; the image stands for one tile of the tiling.
    plan_d = (ext.get("transform") or {}).get("plan")
    plan = InputPlan(**plan_d) if plan_d else None
    stain = None
    if ext.get("stain"):
        from hefeat.slides.stain import StainReference

        stain = StainReference.from_dict(ext["stain"]).normalizer()
    size = plan.tile_px if plan else int(ext["patch_size"])
    arr = np.array(img.resize((size, size), Image.Resampling.LANCZOS))
    enc = create_encoder(ext["encoder"], weights=ext.get("weights_source", ext["weights"]), layer=ext.get("layer"),
                         seed=int(ext.get("seed", 0)), store=store)
    if enc.config.weights_digest != ext["weights_digest"]:
        raise HefeatError(f"The encoder re-created for {extraction_id} has other weights than the extraction "
                          f"(digest {enc.config.weights_digest} != {ext['weights_digest']}); is the weights file changed?")
    choice = ext.get("precision_choice") or {}
    prepare_network(enc.net, fold_bn=bool(choice.get("fold_bn")), fuse_residual=bool(choice.get("fuse_residual")))
    x = torch.from_numpy(arr[None])
    f = embed_batch(enc, DeviceTransform(enc.config, "cpu", plan=plan, stain=stain), x, device="cpu", precision=ext["precision"],
                    tta=bool(ext.get("tta")))
    return f[0].numpy()
