"""Tile grids at a physical resolution, the papers' tile filters, and spot-centred patches."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError, NoTissueError
from hefeat.slides.qc import tile_qc
from hefeat.slides.reader import Slide
from hefeat.slides.tissue import TissueMask, detect_tissue

BACKGROUND_RULES = ("otsu", "mean-rgb", "density")
TILING_VERSION = 4  # bump when tile selection changes, so new runs get new tiling ids (2: unimodal images, small ROIs;
# 3: the glass | pale-tissue cut of tissue.glass_cut; 4: a pixel is also tissue by its neighbourhood's mean colour,
# tissue.TEXTURE_UM)
# Per-slide overrides a manifest may carry (hefeat tile --manifest): tissue detection only.
UPSAMPLE_TOLERANCE = 0.10  # tiles may be up to 10 % finer than a slide's level 0 without --allow-upsample
_MASK_ONLY = ("min_object_um2", "max_hole_um2", "mask_mpp")  # settings of the tissue mask, unused with mask off
OVERRIDABLE = ("tissue_threshold", "min_object_um2", "max_hole_um2", "mask", "mask_mpp")


@dataclass(frozen=True)
class TilingParams:
    """Everything that decides which tiles a slide gets; its hash is the tiling id.

    background: 'otsu' keeps tiles whose Otsu tissue fraction >= tissue_threshold;
    'mean-rgb' (HE2RNA/PathoMCH) drops tiles whose share of pixels with mean RGB > rgb_background
    exceeds max_background; 'density' (Ektefaie) keeps the top_n tiles by share of pixels with
    R, G, B all < density_level.
    """

    mpp: float = 0.5
    size: int = 224
    stride: int | None = None
    tissue_threshold: float = 0.5
    background: str = "otsu"
    max_background: float = 0.5
    rgb_background: float = 220.0
    density_level: int = 200
    top_n: int | None = None
    max_tiles: int | None = None
    seed: int = 0
    spots: bool = False
    mask_mpp: float = 8.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0
    mask: bool = True
    overrides: tuple = ()  # ((slide_id, ((param, value), ...)), ...): per-slide tissue settings, part of the id
    version: int = TILING_VERSION
    upsample: bool = False  # allow tiles finer than a slide's level 0 by > UPSAMPLE_TOLERANCE (not in the id)

    def __post_init__(self):
        if not (self.mpp > 0):
            raise HefeatError(f"tile mpp must be > 0 µm/px, got {self.mpp}")
        if self.size < 8:
            raise HefeatError(f"tile size must be at least 8 px, got {self.size}")
        if self.stride is not None and self.stride < 1:
            raise HefeatError(f"stride must be >= 1 px, got {self.stride}")
        if self.background not in BACKGROUND_RULES:
            raise HefeatError(f"background rule {self.background!r} unknown; use one of {', '.join(BACKGROUND_RULES)}")
        if not 0 <= self.tissue_threshold <= 1 or not 0 <= self.max_background <= 1:
            raise HefeatError("tissue_threshold and max_background are shares in [0, 1]")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise HefeatError(f"max_tiles must be >= 1, got {self.max_tiles}")
        if not (self.mask_mpp > 0) or self.min_object_um2 < 0 or self.max_hole_um2 < 0:
            raise HefeatError("mask_mpp must be > 0 µm/px; min_object_um2 and max_hole_um2 must be >= 0 µm²")

    def to_dict(self) -> dict:
        """Parameters as a plain dict (the tiling id is derived from it)."""
        return asdict(self)

    def id_dict(self) -> dict:
        """`to_dict()` without what has no effect on the tiles: `upsample`; with mask off, the tissue-mask settings
        (min_object_um2, max_hole_um2, mask_mpp: the mask is all tissue at any resolution) are left at
        their defaults, so `--no-mask --min-object-um2 5` is the same tiling as `--no-mask`."""
        d = self.to_dict()
        d.pop("upsample")  # permission, not a setting: the tiles of a slide it allows are the same either way
        if not self.mask:
            for f in fields(self):
                if f.name in _MASK_ONLY:
                    d[f.name] = f.default
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TilingParams:
        """Parameters back from `to_dict()` (e.g. a tiling's _tiling.json); unknown keys are an error."""
        d = dict(d)
        d["overrides"] = tuple((sid, tuple((k, v) for k, v in vals)) for sid, vals in d.get("overrides", ()))
        return cls(**d)

    @classmethod
    def from_spec(cls, spec: str) -> TilingParams:
        """Parameters from 'mpp=0.5,size=224,background=mean-rgb' (the keys of `hefeat tile`, underscores or dashes)."""
        types = {f.name: f.type for f in fields(cls)}
        vals: dict = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            k, eq, v = item.partition("=")
            k = k.strip().replace("-", "_")
            if not eq or k not in types or k in ("overrides", "version"):
                raise HefeatError(f"--tile expects KEY=VALUE pairs like mpp=0.5,size=224; {item!r} is not one "
                                  f"(keys: {', '.join(n for n in types if n not in ('overrides', 'version'))})")
            v = v.strip()
            t = str(types[k])
            try:
                if "bool" in t:
                    vals[k] = v.lower() in ("1", "true", "yes", "y", "on")
                elif v.lower() == "none" and "None" in t:
                    vals[k] = None
                elif "int" in t:
                    vals[k] = int(v)
                elif "float" in t:
                    vals[k] = float(v)
                else:
                    vals[k] = v
            except ValueError:
                raise HefeatError(f"--tile: {k}={v!r} is not a {t.split()[0]}") from None
        return cls(**vals)

    def for_slide(self, slide_id: str) -> TilingParams:
        """These parameters with `slide_id`'s overrides applied (and no override table)."""
        own = dict(dict(self.overrides).get(slide_id, ()))
        return replace(self, overrides=(), **own)


def read_overrides(path) -> tuple:
    """Per-slide tissue settings from a CSV/TSV/Parquet manifest (slide_id, or path whose stem is the id)."""
    from hefeat.store.ingest import read_table

    m = read_table(path)
    if "slide_id" not in m.columns and "path" not in m.columns:
        raise HefeatError(f"{path} needs a slide_id (or path) column next to any of: {', '.join(OVERRIDABLE)}")
    cols = [c for c in m.columns if c in OVERRIDABLE]
    if not cols:
        raise HefeatError(f"{path} has none of the per-slide columns {', '.join(OVERRIDABLE)}")
    out = []
    for _, r in m.iterrows():
        sid = str(r["slide_id"]) if "slide_id" in m.columns and pd.notna(r["slide_id"]) else Path(str(r["path"])).stem
        vals = []
        for c in cols:
            v = r[c]
            if pd.isna(v):
                continue
            if c == "mask":
                v = str(v).strip().lower() not in ("0", "false", "no", "n", "off")
            else:
                try:
                    v = float(v)
                except ValueError:
                    raise HefeatError(f"{path}: {c} of slide {sid} is {v!r}, not a number") from None
            vals.append((c, v))
        if vals:
            out.append((sid, tuple(sorted(vals))))
    params = TilingParams(overrides=tuple(sorted(out)))
    for sid, _ in params.overrides:
        params.for_slide(sid)  # validates each slide's values
    return params.overrides


def _tissue_fraction(mask: TissueMask, slide_mpp: float, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
    """Tissue share of each tile (level-0 top-left xs, ys; side size0) from the mask's integral image."""
    scale = slide_mpp / mask.mpp  # level-0 px -> mask px
    h, w = mask.mask.shape
    ii = np.zeros((h + 1, w + 1), np.float64)
    ii[1:, 1:] = mask.mask.cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(xs * scale).astype(int), 0, w)
    y0 = np.clip(np.floor(ys * scale).astype(int), 0, h)
    x1 = np.clip(np.ceil((xs + size0) * scale).astype(int), 0, w)
    y1 = np.clip(np.ceil((ys + size0) * scale).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    # Area outside the slide counts as background.
    full = np.maximum(np.ceil(size0 * scale) ** 2, 1)
    return np.clip(s / np.maximum(area, full), 0, 1)


def grid(slide: Slide, params: TilingParams) -> pd.DataFrame:
    """Every grid position over the slide: x, y (level-0 top-left), row, col, size0."""
    size0 = slide.level0_size(params.size, params.mpp)
    step0 = slide.level0_size(params.stride or params.size, params.mpp)
    w0, h0 = slide.dimensions
    ncol = max(0, int(np.floor((w0 - size0) / step0)) + 1)
    nrow = max(0, int(np.floor((h0 - size0) / step0)) + 1)
    rows, cols = np.mgrid[0:nrow, 0:ncol]
    rows, cols = rows.ravel(), cols.ravel()
    return pd.DataFrame(
        {
            "x": np.round(cols * step0).astype(np.int64),
            "y": np.round(rows * step0).astype(np.int64),
            "row": rows.astype(np.int32),
            "col": cols.astype(np.int32),
            "size0": np.full(rows.size, size0, np.float64),
        }
    )


def read_tiles(slide: Slide, df: pd.DataFrame, params: TilingParams, threads: int, *,
               order: np.ndarray | None = None, on_tile=None) -> pd.DataFrame:
    """Read every tile of `df` at the target resolution once and return its QC columns (aligned to df).

    Tiles are read in `order` (positions into df; default: df's order) on `threads` threads, at most
    a few dozen in flight; `on_tile(pos, rgb, qc)` sees each decoded tile in that order on the
    calling thread (the decode-once extraction embeds them there).
    """

    def one(pos):
        x, y = coords[pos]
        rgb = slide.read(x, y, params.size, params.mpp)
        return rgb, tile_qc(rgb, rgb_background=params.rgb_background, density_level=params.density_level)

    coords = list(zip(df["x"].tolist(), df["y"].tolist(), strict=True))
    positions = range(len(coords)) if order is None else [int(i) for i in order]
    rows: list = [None] * len(coords)
    for pos, (rgb, qc) in _ordered_map(one, positions, threads if len(coords) > 8 else 1):
        rows[pos] = qc
        if on_tile is not None:
            on_tile(pos, rgb, qc)
    return pd.DataFrame(rows, index=df.index)


def _ordered_map(fn, items, threads: int):
    """(item, fn(item)) in order, computed on `threads` threads with a bounded window (tiles are not all held)."""
    if threads <= 1:
        for it in items:
            yield it, fn(it)
        return
    from collections import deque

    window = threads * 8
    pending: deque = deque()
    with ThreadPoolExecutor(threads) as ex:  # OpenSlide reads release the GIL
        for it in items:
            pending.append((it, ex.submit(fn, it)))
            if len(pending) >= window:
                i, f = pending.popleft()
                yield i, f.result()
        while pending:
            i, f = pending.popleft()
            yield i, f.result()


def _qc_all(slide: Slide, df: pd.DataFrame, params: TilingParams, threads: int) -> pd.DataFrame:
    """Read every tile of `df` at the target resolution (in scan order) and add QC columns."""
    return pd.concat([df, read_tiles(slide, df, params, threads)], axis=1)


def sample_positions(n: int, params: TilingParams) -> np.ndarray | None:
    """Positions kept by the seeded --max-tiles sample of `n` tiles (None: all)."""
    if params.max_tiles is None or n <= params.max_tiles:
        return None
    rng = np.random.default_rng(params.seed)
    return np.sort(rng.choice(n, params.max_tiles, replace=False))


def _finish(df: pd.DataFrame, params: TilingParams) -> pd.DataFrame:
    keep = sample_positions(len(df), params)
    if keep is not None:
        df = df.iloc[keep]
    df = df.sort_values(["row", "col"], kind="stable").reset_index(drop=True)
    df.insert(0, "tile_id", np.arange(len(df), dtype=np.int64))
    float_cols = ["tissue_frac", "sharpness", "mean_r", "mean_g", "mean_b", "background_frac", "density"]
    for c in float_cols:
        df[c] = df[c].astype(np.float32)
    return df


def mask_resolution(slide: Slide, params: TilingParams) -> float:
    """µm/px of the tissue thumbnail: params.mask_mpp, finer for small images (>= 100 px on the short side)."""
    short_um = min(slide.dimensions) * slide.mpp.x
    return max(slide.mpp.x, min(params.mask_mpp, short_um / 100))


def slide_tissue(slide: Slide, params: TilingParams) -> TissueMask:
    """The tissue mask tiling uses (deterministic in the slide and params; QC redraws it)."""
    thumb = slide.thumbnail(mask_resolution(slide, params))
    mask_mpp = slide.mpp.x * slide.dimensions[0] / thumb.shape[1]
    if not params.mask:
        return TissueMask(mask=np.ones(thumb.shape[:2], bool), mpp=mask_mpp, threshold=0.0)
    return detect_tissue(thumb, mask_mpp, min_object_um2=params.min_object_um2, max_hole_um2=params.max_hole_um2)


def check_resolution(slide_mpp: float, params: TilingParams, name: str) -> None:
    """Refuse tiles finer than the slide's level 0 by more than UPSAMPLE_TOLERANCE unless params.upsample."""
    if params.upsample or params.mpp >= slide_mpp * (1 - UPSAMPLE_TOLERANCE):
        return
    raise HefeatError(
        f"{name} is scanned at {slide_mpp:g} µm/px; tiles at {params.mpp:g} µm/px would upsample it "
        f"{slide_mpp / params.mpp:.2f}x (invented detail). Tile at --mpp {slide_mpp:g} or coarser, or pass "
        "--allow-upsample (hefeat run: --set tiling.upsample=true) to accept it", reason_code="upsample")


def tile_candidates(slide: Slide, params: TilingParams) -> tuple[pd.DataFrame, TissueMask]:
    """Grid tiles worth reading (tissue share >= the Otsu prefilter) and the tissue mask; NoTissueError if none."""
    if params.spots:
        raise HefeatError("spot tilings come from spot_tiles(), not tile_slide()")
    check_resolution(slide.mpp.x, params, f"slide {slide.path.name}")
    tissue = slide_tissue(slide, params)
    if not tissue.mask.any():
        raise NoTissueError(f"no tissue found (Otsu threshold {tissue.threshold:.3f} on saturation)")
    df = grid(slide, params)
    df["tissue_frac"] = _tissue_fraction(tissue, slide.mpp.x, df["x"].to_numpy(), df["y"].to_numpy(), df["size0"].iloc[0] if len(df) else 0.0)
    prefilter = params.tissue_threshold if params.background == "otsu" else 1e-9
    if df.empty:  # no whole tile fits in the image: not a tissue question (also with --no-mask)
        w_um, h_um = slide.dimensions[0] * slide.mpp.x, slide.dimensions[1] * slide.mpp.y
        raise NoTissueError(f"image ({w_um:.0f} x {h_um:.0f} µm) is smaller than one tile "
                            f"({params.size * params.mpp:g} µm); use a smaller --size or --mpp")
    df = df[df["tissue_frac"] >= prefilter]
    if df.empty:
        raise NoTissueError(f"no tile reaches tissue fraction {prefilter:g}")
    return df, tissue


def select_tiles(df: pd.DataFrame, params: TilingParams) -> pd.DataFrame:
    """Candidates with QC columns -> the kept tiles (background rule, --max-tiles), tile_id in scan order."""
    if params.spots:  # every spot is kept (--max-tiles aside)
        return _finish(df, params)
    if params.background == "mean-rgb":
        df = df[df["background_frac"] <= params.max_background]
    elif params.background == "density":
        n = params.top_n or 200
        df = df.sort_values(["density", "row", "col"], ascending=[False, True, True]).head(n)
        df = df[df["density"] > 0]
    if df.empty:
        raise NoTissueError(f"no tile passes the {params.background!r} background rule")
    return _finish(df, params)


def tile_slide(slide: Slide, params: TilingParams, *, threads: int | None = None) -> tuple[pd.DataFrame, TissueMask]:
    """Tissue tiles of one slide with QC columns (one row per tile, tile_id = scan order).

    Raises NoTissueError when no tile passes the rules.
    """
    threads = threads or min(4, os.cpu_count() or 1)
    df, tissue = tile_candidates(slide, params)
    return select_tiles(_qc_all(slide, df, params, threads), params), tissue


def spot_candidates(slide: Slide, spots: pd.DataFrame, params: TilingParams) -> pd.DataFrame:
    """One patch per spot, centred on the spot's level-0 (x, y), in (y, x) order, before QC."""
    check_resolution(slide.mpp.x, params, f"slide {slide.path.name}")
    if spots.empty:
        raise HefeatError("this slide has no spots; ingest a spots table first (hefeat ingest spots)")
    size0 = slide.level0_size(params.size, params.mpp)
    sp = spots.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    df = pd.DataFrame(
        {
            "spot_id": sp["spot_id"].astype(str),
            "x": np.round(sp["x"].to_numpy() - size0 / 2).astype(np.int64),
            "y": np.round(sp["y"].to_numpy() - size0 / 2).astype(np.int64),
            "row": _dense_rank(sp["y"].to_numpy()),
            "col": _dense_rank(sp["x"].to_numpy()),
            "size0": np.full(len(sp), size0),
        }
    )
    df["tissue_frac"] = np.float32(np.nan)
    return df


def spot_tiles(slide: Slide, spots: pd.DataFrame, params: TilingParams, *, threads: int | None = None) -> pd.DataFrame:
    """One patch per spot, centred on the spot's level-0 (x, y); keeps spot_id and a grid row/col."""
    threads = threads or min(4, os.cpu_count() or 1)
    df = spot_candidates(slide, spots, params)
    return select_tiles(_qc_all(slide, df, params, threads), params)


def _dense_rank(v: np.ndarray, tol: float = 2.0) -> np.ndarray:
    """Grid index of each coordinate: positions within `tol` px share an index."""
    u = np.unique(np.round(v / tol))
    return np.searchsorted(u, np.round(v / tol)).astype(np.int32)
