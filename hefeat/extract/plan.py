"""An extraction's plan: which tiling and slides, which encoder, input and precision, its id and metadata.

`plan_extraction` decides everything an extraction is before a tile is embedded: the tiling (or the
decode-once plan that tiles as it embeds), the slides this worker does, the device, the encoder and
how tiles become its input (size, stain normalisation), the extraction id, the precision (measured
once per extraction with --precision auto, then recorded) and the provenance written to
_extraction.json. hefeat.extract.pipeline runs a plan.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hefeat import __version__
from hefeat.errors import HefeatError
from hefeat.extract.compute import DeviceTransform, InputPlan, plan_input
from hefeat.extract.decode_once import DecodeOnce
from hefeat.extract.encoders import Encoder, EncoderConfig, create_encoder
from hefeat.extract.precision import CHOICES, PrecisionChoice, cached_precision, select_precision
from hefeat.runner import shard_slides
from hefeat.store import ids, layout
from hefeat.store.catalog import Store
from hefeat.store.runs import timestamp

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hefeat.slides.tiling import TilingParams

PRECISIONS = CHOICES
DEFAULT_BATCH = 64
GPU_BATCH_LADDER = (64, 128, 256, 512)
CALIBRATION_TILES = {"cpu": 8, "cuda": 64}


def resolve_device(device: str | None = None) -> str:
    """'cuda' when a GPU is visible, else 'cpu' (or the given device)."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def extraction_id(tiling_id: str, cfg: EncoderConfig, *, precision: str, tta: bool, dtype: str,
                  inputs: dict | None = None) -> str:
    """Content-derived id over tiling, encoder, weights digest, layer, transform, precision, TTA and dtype.

    `inputs` holds what else changes the pixels the encoder sees (input plan, stain normalisation).
    """
    return ids.extraction_id(tiling_id, cfg.to_dict(), precision=precision, tta=tta, dtype=dtype, inputs=inputs)

@dataclass
class ExtractOptions:
    """How to run an extraction (none of these change the features except those in the id)."""

    batch_size: int | None = None  # None: DEFAULT_BATCH, or measured on GPUs with --precision auto
    workers: int | None = None
    device: str | None = None
    compile: bool = False
    decode: str = "auto"  # auto (device JPEG decode on CUDA when every slide allows it) | cpu | device
    fail_fast: bool = False
    progress: bool = False
    extra: dict = field(default_factory=dict)



@dataclass
class ExtractionPlan:
    """Everything an extraction is, decided before any tile is embedded (`plan_extraction`)."""

    tiling_id: str
    tiling: dict
    tiled_rows: pd.DataFrame  # the tiling's finished slides (slide_id, n_tiles, digest, ...)
    todo: list[str]  # slides of the finished tiling this worker embeds
    once: DecodeOnce | None  # slides tiled and embedded from one read (tile_params given)
    device: str
    enc: Encoder
    input: InputPlan
    stain: Any  # a fitted StainReference, or None
    transform: DeviceTransform
    inputs: dict  # what else changes the pixels the encoder sees (part of the id)
    extraction_id: str
    choice: PrecisionChoice
    calibrate_s: float
    opt: ExtractOptions
    spec: dict  # as asked: encoder, weights, layer, precision, tta, dtype, seed, shard

    @property
    def cfg(self) -> EncoderConfig:
        """The encoder's configuration."""
        return self.enc.config

    @property
    def precision(self) -> str:
        """The precision the extraction runs at (the decided one when 'auto' was asked)."""
        return self.choice.precision

    def metadata(self) -> dict:
        """The extraction's provenance record (_extraction.json)."""
        cfg, s, tiling, weights = self.cfg, self.spec, self.tiling, self.spec["weights"]
        return {
            "extraction_id": self.extraction_id, "tiling_id": self.tiling_id, "encoder": cfg.name, "layer": cfg.layer,
            "weights": cfg.weights,
            "weights_source": str(Path(weights).absolute()) if weights and Path(weights).exists() else (weights or "imagenet"),
            "seed": s["seed"],
            "weights_digest": cfg.weights_digest, "dim": cfg.dim, "precision": self.precision,
            "precision_spec": s["precision"], "tta": s["tta"], "dtype": s["dtype"],
            "precision_choice": self.choice.to_dict(),
            "transform": {"input_size": list(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std),
                          "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct, **self.inputs},
            "stain": self.stain.to_dict() if self.stain else None,
            "patch_size": tiling["size"], "mpp": tiling["mpp"], "encoder_mpp": self.input.encoder_mpp,
            "code_version": __version__, "batch_size": self.opt.batch_size, "created": timestamp(),
            **{f"source_{k}": v for k, v in (self.enc.provenance or {}).items()},
        }


def plan_extraction(
    store: Store,
    *,
    tiling_id: str | None = None,
    encoder: str = "resnet50",
    weights: str | None = None,
    layer: str | None = None,
    precision: str = "auto",
    tta: bool = False,
    dtype: str = "float16",
    seed: int = 0,
    slides: list[str] | None = None,
    shard: str | None = None,
    fit: str = "auto",
    stain: str | None = None,
    stain_reference: str | None = None,
    options: ExtractOptions | None = None,
    tile_params: TilingParams | None = None,
) -> ExtractionPlan:
    """Decide an extraction (arguments as hefeat.extract.pipeline.run_extraction): tiling, slides, encoder, id, precision."""
    opt = options or ExtractOptions()
    store.require()
    if dtype not in ("float16", "float32"):
        raise HefeatError(f"--dtype must be float16 or float32, got {dtype!r}")
    if opt.batch_size is not None and opt.batch_size < 1:
        raise HefeatError("--batch-size must be >= 1")
    once = DecodeOnce.plan(store, tile_params, tiling_id, slides, shard, stain=stain, stain_reference=stain_reference,
                           opt=opt) if tile_params is not None else None
    tid = once.tiling_id if once else (tiling_id or _default_tiling(store))
    tiling = store.tiling(tid)
    tiled_rows = store.finished("tiling", tid)
    tiled = tiled_rows["slide_id"].tolist()
    all_tiled = list(tiled)  # a cohort stain reference is fitted over all of them, whatever this run does
    if once:
        have = set(tiled)
        todo = [s for s in once.mine if s in have]
    else:
        if slides:
            missing = sorted(set(slides) - set(tiled))
            if missing:
                raise HefeatError(f"Slides not tiled in tiling {tid}: {', '.join(missing)}. Run hefeat tile first.")
            tiled = [s for s in tiled if s in set(slides)]
        todo = shard_slides(tiled, shard)
    device = resolve_device(opt.device)
    enc = create_encoder(encoder, weights=weights, layer=layer, seed=seed, store=store)
    cfg = enc.config
    plan = plan_input(int(tiling["size"]), float(tiling["mpp"]), cfg, fit=fit)
    stain_ref = fit_stain(store, tid, all_tiled, stain, stain_reference) if stain else None
    transform = DeviceTransform(cfg, device, plan=plan, stain=stain_ref.normalizer() if stain_ref else None)
    inputs = {"plan": plan.to_dict(), **({"stain": stain_ref.to_dict()} if stain_ref else {})}
    # The id follows the spec (--precision as asked): an 'auto' extraction is one extraction on every worker,
    # whatever each one would measure; the measured precision is decided once and recorded in it.
    eid = extraction_id(tid, cfg, precision=precision, tta=tta, dtype=dtype, inputs=inputs)
    t_cal = time.perf_counter()
    choice = choose_precision(enc, transform, store, tid, all_tiled, device=device, requested=precision,
                              batch_size=opt.batch_size, fallback=once.sample_tiles if once else None,
                              decision_path=layout.precision_decision_path(store.root, eid))
    calibrate_s = time.perf_counter() - t_cal
    opt = dataclasses.replace(opt, batch_size=opt.batch_size or choice.batch_size or DEFAULT_BATCH)
    return ExtractionPlan(tid, tiling, tiled_rows, todo, once, device, enc, plan, stain_ref, transform, inputs, eid,
                          choice, calibrate_s, opt, {"encoder": encoder, "weights": weights, "layer": layer,
                                                     "precision": precision, "tta": tta, "dtype": dtype, "seed": seed,
                                                     "shard": shard})


STAIN_SAMPLE = 64  # tiles of the cohort a stain reference is fitted to by default


def fit_stain(store: Store, tiling_id: str, slide_ids: list[str], method: str, reference: str | None):
    """A StainReference fitted to an image file, or to STAIN_SAMPLE seeded tiles over all `slide_ids`.

    The cohort sample is drawn from every tiled slide (not this shard's), so all shards agree.
    """
    from PIL import Image

    from hefeat.slides.stain import METHODS, fit_reference

    if method not in METHODS:
        raise HefeatError(f"--stain-norm must be one of {', '.join(METHODS)}, got {method!r}")
    if reference and reference != "cohort":
        p = Path(reference)
        if not p.exists():
            raise HefeatError(f"stain reference image not found: {p}")
        try:
            img = np.asarray(Image.open(p).convert("RGB"))
        except Exception as e:
            raise HefeatError(f"cannot read stain reference {p.name}: {type(e).__name__}: {e}") from None
        return fit_reference(method, [img], source=f"image:{p.name}")
    tiling = store.tiling(tiling_id)
    rng = np.random.default_rng(0)
    ids = sorted(slide_ids)
    per = max(1, -(-STAIN_SAMPLE // max(len(ids), 1)))
    imgs = []
    from hefeat.slides.reader import open_catalog_slide

    rows = store.slides(ids).set_index("slide_id") if ids else None
    for sid in ids:
        t = store.tiles(tiling_id, sid)
        if t.empty:
            continue
        pick = t.iloc[np.sort(rng.choice(len(t), min(per, len(t)), replace=False))]
        with open_catalog_slide(rows.loc[sid], verify=False) as s:
            imgs += [s.read(x, y, int(tiling["size"]), float(tiling["mpp"])) for x, y in pick[["x", "y"]].to_numpy()]
        if len(imgs) >= STAIN_SAMPLE:
            break
    return fit_reference(method, imgs, source=f"cohort:{len(imgs)} tiles of tiling {tiling_id}")


CALIBRATION_SEED = 0


def calibration_tiles(store: Store, tiling_id: str, slide_ids: list[str], n: int, *, seed: int = CALIBRATION_SEED
                      ) -> np.ndarray | None:
    """Up to `n` real tiles (n, size, size, 3) uint8: a seeded sample across `slide_ids` (the cohort's tiled slides).

    The same slides and tiles whichever worker draws it (slides sorted, one seeded generator), so a
    calibration does not depend on which slides a worker, shard or --slides subset happens to start with.
    """
    from hefeat.slides.reader import open_catalog_slide

    tiling = store.tiling(tiling_id)
    ids = sorted(slide_ids)
    if not ids:
        return None
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(ids), min(n, len(ids)), replace=False).tolist())
    per = -(-n // len(pick))
    rows = store.slides([ids[i] for i in pick]).set_index("slide_id")
    imgs: list[np.ndarray] = []
    for i in pick:
        sid = ids[i]
        try:
            tiles = store.tiles(tiling_id, sid)
            if tiles.empty:
                continue
            take = tiles.iloc[np.sort(rng.choice(len(tiles), min(per, len(tiles)), replace=False))]
            with open_catalog_slide(rows.loc[sid], verify=False) as s:
                imgs += [s.read(x, y, int(tiling["size"]), float(tiling["mpp"])) for x, y in take[["x", "y"]].to_numpy()]
        except Exception:  # noqa: BLE001  (an unreadable slide fails later with its own reason)
            continue
        if len(imgs) >= n:
            break
    return np.stack(imgs[:n]) if imgs else None


def choose_precision(enc: Encoder, transform: DeviceTransform, store: Store, tiling_id: str, slide_ids: list[str], *,
                     device: str, requested: str, batch_size: int | None, fallback=None,
                     decision_path: Path | None = None) -> PrecisionChoice:
    """Resolve --precision for this encoder on this device, calibrating on real tiles of the cohort when 'auto'.

    With `decision_path` (the extraction's recorded decision), 'auto' is decided once per extraction:
    the first worker measures on a seeded sample across `slide_ids` and commits its choice with a
    no-clobber write; every later worker (shard, node, --slides subset, re-run) reads it and measures
    nothing. `fallback(n)` gives tiles when no slide is tiled yet (decode once reads grid candidates).
    """
    import torch

    from hefeat.extract.fold import prepare_network

    enc.to(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    rec = read_precision_decision(decision_path) if requested == "auto" and decision_path is not None else None
    recorded = recorded_choice(rec, device) if rec is not None else None
    # 'auto' also runs the network with its BatchNorms folded and its ResNet blocks' last conv, add and ReLU as one
    # call (hefeat.extract.fold), decided with the precision: an extraction recorded before either existed says
    # nothing of it and keeps running without it.
    folded, residual = prepare_network(enc.net, fold_bn=recorded.fold_bn if recorded else requested == "auto",
                                       fuse_residual=recorded.fuse_residual if recorded else True)
    if recorded is not None:
        transform.channels_last = recorded.channels_last
        return dataclasses.replace(recorded, fuse_residual=residual)  # what this worker runs (none on a GPU)
    n = CALIBRATION_TILES.get(kind, 8)
    size = transform.plan.tile_px if transform.plan else transform.size[0]
    ladder = GPU_BATCH_LADDER if kind == "cuda" and batch_size is None else (None,)
    model_key = {**enc.config.to_dict(), "plan": transform.plan.to_dict() if transform.plan else None,
                 "fold_bn": folded, "fuse_residual": residual}
    choice = None
    if requested == "auto":  # this machine's cached calibration, if any, needs no tiles read (only their shape)
        noise = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            shape = transform(torch.from_numpy(noise)).shape
        choice = cached_precision(enc, (n, *shape[1:]), device=device, model_key=model_key, batch_sizes=ladder)
    sample_tiles = 0
    if choice is None:
        imgs = calibration_tiles(store, tiling_id, slide_ids, n) if requested == "auto" else None
        if imgs is None and requested == "auto" and fallback is not None:
            imgs = fallback(n)
        if imgs is None:  # nothing to read (all done, or a fixed precision): uniform noise has the right shape
            imgs = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            sample = transform(torch.from_numpy(imgs))
        sample_tiles = int(len(imgs))
        choice = select_precision(enc, sample, device=device, requested=requested, batch_sizes=ladder,
                                  model_key=model_key)
    choice = dataclasses.replace(choice, fold_bn=folded, fuse_residual=residual)
    if requested == "auto" and decision_path is not None:
        from hefeat.store.atomic import write_json_once

        rec, mine = write_json_once(decision_path, {**choice.to_dict(), "decided_at": timestamp(),
                                                    "device_kind": kind, "sample_tiles": sample_tiles})
        if not mine:  # another worker decided first: its decision is the extraction's
            choice = recorded_choice(rec, device)
            if (choice.fold_bn, choice.fuse_residual) != (folded, residual):  # an older hefeat's worker decided first
                raise HefeatError(f"this extraction's first worker recorded fold_bn={choice.fold_bn}, fuse_residual="
                                  f"{choice.fuse_residual} (an older hefeat?) while this worker decided fold_bn={folded}, "
                                  f"fuse_residual={residual}; nothing was embedded: run it again and it follows the "
                                  "record (and run one hefeat version on every worker)")
    transform.channels_last = choice.channels_last
    return choice


def read_precision_decision(path: Path) -> dict | None:
    """The recorded precision decision of an extraction, or None when none is recorded yet."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HefeatError(f"the recorded precision decision {path} cannot be read ({e}); "
                          "it is written once and never changed: restore it, or remove the extraction") from None


def recorded_choice(rec: dict, device: str) -> PrecisionChoice:
    """The PrecisionChoice an extraction recorded, as this worker runs it (refused where the device cannot)."""
    from hefeat.extract.precision import device_capabilities

    prec = rec["precision"]
    caps = device_capabilities(device)
    if prec != "fp32" and caps.get(prec, "no") == "no":
        raise HefeatError(f"this extraction's precision was decided as {prec} (recorded by its first worker on "
                          f"{rec.get('machine') or rec.get('device')}), but {caps['name']} cannot run {prec}; "
                          "run it on a device that can, or extract with --precision fp32 (another extraction)")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    same_kind = rec.get("device_kind", kind) == kind  # a batch size measured on another kind of device is not ours
    return PrecisionChoice(prec, bool(rec.get("channels_last", True)), rec.get("batch_size") if same_kind else None,
                           device, "recorded", f"decided once for this extraction ({rec.get('reason', '')})",
                           rec.get("machine", ""), tuple(rec.get("trials", ())), rec.get("excluded", {}),
                           rec.get("key", ""), bool(rec.get("fold_bn", False)), bool(rec.get("fuse_residual", False)))


def _default_tiling(store: Store) -> str:
    t = store.sql("SELECT tiling_id FROM tilings WHERE NOT spots ORDER BY created")
    if t.empty:
        raise HefeatError("No tiling in the store yet. Run: hefeat tile --mpp 0.5 --size 224")
    if len(t) > 1:
        raise HefeatError(f"The store has several tilings ({', '.join(t['tiling_id'])}); pass --tiling ID")
    return str(t["tiling_id"].iloc[0])
