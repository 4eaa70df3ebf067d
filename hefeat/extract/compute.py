"""The device side of extraction: uint8 tiles -> what the encoder sees -> embeddings, checked.

`plan_input` decides, once per extraction, how a tile of `tile_px` at `tile_mpp` becomes the
encoder's input without lying about resolution: identity when sizes match, a centre crop when the
tile is the model's evaluation resize (input / crop_pct, timm's eval transform) or the user asks
for one, a resize only within a stated tolerance (or when asked), and the µm/px the encoder saw
goes into provenance. `DeviceTransform` runs that plan, optional stain normalisation and the
mean/std on the device; `embed_batch` runs the encoder under autocast; `check_finite` turns a
non-finite row into an error for that slide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hefeat.errors import HefeatError
from hefeat.extract.encoders import Encoder, EncoderConfig
from hefeat.extract.precision import autocast

FITS = ("auto", "identity", "crop", "resize", "native")
RESIZE_TOLERANCE = 0.10  # a resize may change µm/px by at most 10 % unless --fit resize says so


@dataclass(frozen=True)
class InputPlan:
    """How tiles become encoder input, and the resolution the encoder sees."""

    fit: str  # identity | crop | resize | native
    tile_px: int
    input_px: int
    tile_mpp: float
    encoder_mpp: float
    field_um: float

    def to_dict(self) -> dict:
        """Plain-dict form (provenance; part of the extraction id)."""
        return asdict(self)


def plan_input(tile_px: int, tile_mpp: float, cfg: EncoderConfig, *, fit: str = "auto",
               tolerance: float = RESIZE_TOLERANCE) -> InputPlan:
    """Plan how `tile_px` tiles at `tile_mpp` µm/px become `cfg.input_size` input; refuse dishonest resizes."""
    if fit not in FITS:
        raise HefeatError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    h, w = cfg.input_size
    if h != w:
        raise HefeatError(f"encoder {cfg.name} wants non-square input {h}x{w}; hefeat tiles are square")
    inp = int(h)
    eval_px = int(round(inp / cfg.crop_pct)) if cfg.crop_pct else inp

    def plan(kind: str, px: int, mpp: float) -> InputPlan:
        return InputPlan(kind, tile_px, px, tile_mpp, round(mpp, 6), round(px * mpp, 3))

    if fit == "auto":
        if tile_px == inp:
            return plan("identity", inp, tile_mpp)
        if tile_px == eval_px and tile_px > inp:  # the model's own evaluation transform: resize then centre crop
            return plan("crop", inp, tile_mpp)
        change = tile_px / inp - 1
        if abs(change) <= tolerance:
            return plan("resize", inp, tile_mpp * tile_px / inp)
        native = "" if cfg.fixed_input_size else f", --fit native (feed {tile_px} px as is)"
        crop = f", --fit crop (centre {inp} px at {tile_mpp:g} µm/px)" if tile_px > inp else ""
        raise HefeatError(
            f"tiles are {tile_px} px at {tile_mpp:g} µm/px but {cfg.name} expects {inp} px: resizing would show it "
            f"{tile_mpp * tile_px / inp:.3g} µm/px ({abs(change):.0%} change > {tolerance:.0%}). Re-tile with "
            f"--size {inp}, or pass --fit resize (accept {tile_mpp * tile_px / inp:.3g} µm/px){crop}{native}."
        )
    if fit == "identity":
        if tile_px != inp:
            raise HefeatError(f"--fit identity needs {inp} px tiles for {cfg.name}, got {tile_px} px")
        return plan("identity", inp, tile_mpp)
    if fit == "crop":
        if tile_px < inp:
            raise HefeatError(f"--fit crop needs tiles of at least {inp} px for {cfg.name}, got {tile_px} px")
        return plan("crop" if tile_px > inp else "identity", inp, tile_mpp)
    if fit == "native":
        if cfg.fixed_input_size and tile_px != inp:
            raise HefeatError(f"{cfg.name} has a fixed input size ({inp} px); --fit native cannot feed {tile_px} px")
        return plan("native" if tile_px != inp else "identity", tile_px, tile_mpp)
    return plan("resize" if tile_px != inp else "identity", inp, tile_mpp * tile_px / inp)


class DeviceTransform:
    """uint8 NHWC batch -> (stain-normalised) float NCHW at the planned size, normalised, on the device."""

    def __init__(self, cfg: EncoderConfig, device: str, *, plan: InputPlan | None = None, stain=None,
                 channels_last: bool = True):
        import torch

        self.plan = plan
        self.size = cfg.input_size
        self.mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device
        self.stain = stain.to(device) if stain is not None else None
        self.channels_last = channels_last

    def __call__(self, x_uint8):
        import torch
        import torch.nn.functional as F

        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.stain is not None:
            x = self.stain(x)
        fit = self.plan.fit if self.plan is not None else "resize"
        th, tw = self.size
        if fit == "crop":
            top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        elif fit == "resize" and tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode=self.mode, antialias=True, align_corners=False).clamp_(0, 255)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def dihedral(x):
    """The 8 rotations/reflections of a NCHW batch."""
    import torch

    out = []
    for flip in (False, True):
        base = torch.flip(x, dims=(3,)) if flip else x
        out.extend(torch.rot90(base, k, dims=(2, 3)) for k in range(4))
    return out


def embed_batch(enc: Encoder, transform: DeviceTransform, x_uint8, *, device: str, precision: str, tta: bool = False):
    """Embeddings (B, dim) float32 tensor on the device for a uint8 NHWC batch."""
    import torch

    x = transform(x_uint8)
    with torch.inference_mode(), autocast(device, precision):
        if tta:
            return torch.stack([enc(v).float() for v in dihedral(x)]).mean(0)
        return enc(x).float()


def check_finite(feats, first_tile: int, precision: str) -> str | None:
    """None if every row of `feats` (B, dim) is finite, else the error that fails the slide."""
    import torch

    bad = ~torch.isfinite(feats).all(dim=1)
    if not bool(bad.any()):
        return None
    rows = (torch.nonzero(bad).flatten() + first_tile).tolist()
    hint = " (fp16 overflow? re-run with --precision fp32 or bf16)" if precision == "fp16" else ""
    return (f"non-finite embeddings for {len(rows)} tile(s) (first: tile {rows[0]}) at precision {precision}{hint}; "
            "nothing was written for this slide")


def feature_attrs(cfg: EncoderConfig, tiling: dict, eid: str, slide_id: str, size0: float, precision: str) -> dict:
    """Attributes of a slide's feature file (what made it, at which tile size)."""
    return {"encoder": cfg.name, "layer": cfg.layer or "", "weights": cfg.weights, "weights_digest": cfg.weights_digest,
            "dim": cfg.dim, "patch_size": int(tiling["size"]), "patch_size_level0": size0, "mpp": float(tiling["mpp"]),
            "tiling_id": tiling["tiling_id"], "extraction_id": eid, "slide_id": slide_id, "precision": precision}
