"""Decode once: tile QC and embedding from one read of each tile, for slides not tiled yet.

`hefeat extract --tile SPEC` (and `run_extraction(..., tiling=params)`) sends every slide that the
tiling has not covered yet through one per-slide step: each grid candidate is read once at the
tiling's resolution, its QC columns computed, and, if the tiling keeps it, its decoded pixels go
straight to the encoder. The step then commits the slide's tiles (the same Parquet and record as
`run_tiling`) and after that its features (the same rows as `run_extraction` on the tiled slide:
batches start at the slide's tile 0 and have the same size). A crash between the two commits
leaves a tiled slide without features, which the ordinary path finishes.

It works when the tiling decides which tiles it keeps, and in which order, while reading: the
Otsu rule (the kept set is known from the tissue mask before any read, also with --max-tiles),
the mean-RGB rule without --max-tiles (a per-tile test) and spot tilings. `why_not` names what
makes a run tile first and extract after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError, NonFiniteError
from hefeat.slides.tiling import (
    TilingParams,
    read_tiles,
    sample_positions,
    select_tiles,
    spot_candidates,
    tile_candidates,
)


def why_not(params: TilingParams, *, stain: str | None, stain_reference: str | None, decode: str) -> str | None:
    """Why a run with these settings cannot embed tiles from the QC read (None: it can)."""
    if params.background == "density":
        return "the density rule keeps the top-N tiles of a slide, known only after reading all of them"
    if params.background == "mean-rgb" and params.max_tiles is not None:
        return "--max-tiles after the mean-rgb rule samples tiles known only after reading all of them"
    if stain and (not stain_reference or stain_reference == "cohort"):
        return "a cohort stain reference is fitted on tiles of every slide, so all slides are tiled first"
    if decode == "device":
        return "decode=device decodes the JPEG tiles on the GPU, apart from the QC read"
    return None


class _TimedSlide:
    """A slide whose reads count and time themselves (what decoding once saves)."""

    def __init__(self, slide):
        self.slide, self.times = slide, []

    def read(self, *args):
        t = time.perf_counter()
        img = self.slide.read(*args)
        self.times.append(time.perf_counter() - t)  # list.append is atomic: reader threads share it
        return img


@dataclass
class FusedSlide:
    """One slide tiled and embedded from one read: its tiles, its feature blocks (start, rows), read counts."""

    tiles: pd.DataFrame
    tissue: object | None
    blocks: list[tuple[int, np.ndarray]] = field(default_factory=list)
    embed_error: BaseException | None = None
    reads: int = 0
    read_s: float = 0.0

    @property
    def coords(self) -> np.ndarray:
        """(n, 2) level-0 x, y of the kept tiles, in tile_id order."""
        return self.tiles[["x", "y"]].to_numpy(np.int64)


def tile_and_embed(slide, params: TilingParams, embed: Callable[[np.ndarray, int], np.ndarray], batch_size: int, *,
                   spots: pd.DataFrame | None = None, threads: int = 1) -> FusedSlide:
    """Tile one slide as tile_slide/spot_tiles do and embed each kept tile from the same decoded pixels.

    `embed(uint8 (b, h, w, 3), first_tile_id) -> rows` is called per batch of `batch_size` kept tiles
    in tile_id order; an exception there is kept in `embed_error` (the tiling still completes).
    """
    timed = _TimedSlide(slide)
    if spots is not None:
        cand, tissue = spot_candidates(slide, spots, params), None
    else:
        cand, tissue = tile_candidates(slide, params)
    n = len(cand)
    per_tile = params.background == "mean-rgb" and not params.spots
    if per_tile:  # kept = passes the background test; scan order is tile_id order
        order = np.arange(n)
        kept_at: dict[int, int] | None = None
    else:  # kept set and tile ids known before reading: read in tile_id order
        keep = sample_positions(n, params)
        keep = np.arange(n) if keep is None else keep
        by_tile = cand.iloc[keep].reset_index(drop=True).sort_values(["row", "col"], kind="stable").index.to_numpy()
        kept_at = {int(keep[i]): t for t, i in enumerate(by_tile)}
        order = cand.reset_index(drop=True).sort_values(["row", "col"], kind="stable").index.to_numpy()
    out = FusedSlide(tiles=cand, tissue=tissue)
    buf: list[np.ndarray] = []
    kept_xy: list[tuple[int, int]] = []
    xs, ys = cand["x"].to_numpy(), cand["y"].to_numpy()

    def flush() -> None:
        start = len(kept_xy) - len(buf)
        if buf and out.embed_error is None:
            try:
                out.blocks.append((start, embed(np.stack(buf), start)))
            except Exception as e:  # noqa: BLE001  (fails the slide's features, not its tiling)
                out.embed_error = e
        buf.clear()

    def on_tile(pos: int, rgb: np.ndarray, qc: dict) -> None:
        if per_tile:
            if not qc["background_frac"] <= params.max_background:
                return
        elif pos not in kept_at:
            return
        kept_xy.append((int(xs[pos]), int(ys[pos])))
        if out.embed_error is None:
            buf.append(rgb)
        if len(buf) >= batch_size:
            flush()

    qc = read_tiles(timed, cand, params, threads, order=order, on_tile=on_tile)
    flush()
    full = pd.concat([cand, qc], axis=1)
    out.tiles = select_tiles(full, params)
    if kept_xy != [tuple(v) for v in out.coords.tolist()]:
        raise HefeatError("decode once: the tiles embedded are not the tiles the tiling kept (a bug: please report it)")
    out.reads, out.read_s = len(timed.times), float(sum(timed.times))
    return out


def run_fused(store, runner, params: TilingParams, slide_ids: list[str], table: pd.DataFrame, *,
              spots: pd.DataFrame | None, embed: Callable[[np.ndarray, int], np.ndarray], batch_size: int, dtype: str,
              attrs: Callable[[str, float], dict], tiles_digest: dict, info: dict, fail_fast: bool = False,
              threads: int | None = None, progress: bool = False) -> dict:
    """Tile and embed `slide_ids` one at a time: tiling committed (its own runner), then features (`runner`).

    `table` is the slide catalog indexed by slide_id; `tiles_digest` (the extraction runner's input
    digests) gains each newly tiled slide's digest. Returns the tiling summary and read counts.
    """
    import os

    from hefeat.extract.writer import FeatureSink, SlideFeatures
    from hefeat.runner import run_slides
    from hefeat.slides.run import (
        open_catalog_slide,
        slide_input_digest,
        tiling_id,
        write_slide_tiles,
    )
    from hefeat.store.features import FeatureFileWriter

    tid = tiling_id(params)
    threads = threads or min(4, os.cpu_count() or 1)
    stats = {"tiles_read_once": 0, "reads": 0, "read_s": 0.0}
    sink = FeatureSink(runner, lambda job: FeatureFileWriter(
        store.features_path(runner.key, job.slide_id), len(job.coords), int(info["dim"]), dtype=dtype,
        coords=job.coords, attrs=attrs(job.slide_id, job.size0)), info, dtype)

    def tile(task) -> dict:
        """The tiling step: tile the slide, embedding each read once; the tiles are committed by run_slides."""
        sid = task.slide_id
        with open_catalog_slide(table.loc[sid]) as slide:
            own = spots[spots["slide_id"] == sid] if spots is not None else None
            res = tile_and_embed(slide, params if own is not None else params.for_slide(sid), embed,
                                 batch_size, spots=own, threads=threads)
        done = write_slide_tiles(store, tid, sid, res.tiles.copy())
        stats["reads"] += res.reads
        stats["read_s"] += res.read_s
        return {"n_tiles": done["n_tiles"], "digest": done["digest"], "_after": res}

    def extract(task, tiled: dict) -> None:
        """Once the slide's tiles are recorded: its features through the extraction runner."""
        sid, res = task.slide_id, tiled["_after"]
        tiles_digest[sid] = tiled["digest"]
        etask = next(iter(runner.claimed([sid])), None)  # done or busy elsewhere: nothing to add
        if etask is None:
            return
        etask.start = task.start
        if res.embed_error is not None:
            runner.fail(etask, res.embed_error)
            return
        coords = res.coords
        job = SlideFeatures(etask, str(table.loc[sid, "path"]), float(table.loc[sid, "mpp_x"]), coords,
                            float(res.tiles["size0"].iloc[0]))
        try:  # the pipeline's writer: same cast, checks, file, fault points and record as a two-pass extraction
            for start, rows in res.blocks or [(0, np.zeros((0, int(info["dim"])), dtype))]:
                sink.put(job, start, rows)
        finally:
            sink.abort(job)  # a crash or Ctrl-C leaves no half-written file behind
        if job.failed:
            return
        stats["tiles_read_once"] += len(coords)

    t = run_slides(store, "tiling", tid, list(slide_ids), tile, fail_fast=fail_fast, progress=progress,
                   desc=f"tile+extract {runner.key}", input_digest=lambda sid: slide_input_digest(table.loc[sid]),
                   after_ok=extract)
    per_read = stats["read_s"] / stats["reads"] if stats["reads"] else 0.0
    stats["read_s_saved_est"] = round(stats["tiles_read_once"] * per_read, 3)
    stats["read_s"] = round(stats["read_s"], 3)
    stats["tiling"] = {"tiling_id": tid, "ok": len(t.ok), "already_done": len(t.done), "skipped": t.skipped,
                       "failed": t.failed, "busy": t.busy, "tiles": t.tiles}
    stats["tiling_summary"] = t
    return stats


@dataclass
class DecodeOnce:
    """An extraction's plan for the slides its tiling has not covered yet (built by `plan`, run by the pipeline)."""

    params: TilingParams
    tiling_id: str
    mine: list[str]  # this process's share of the slides (--shard over all of them)
    fused: list[str]  # of those, the ones to tile and embed from one read
    table: pd.DataFrame  # the slide catalog, indexed by slide_id
    spots: pd.DataFrame | None
    why: str | None  # why slides are tiled first and read again (None: decode once is used)
    tiled_before: int = 0  # slides of this run the tiling had covered before it started
    tiling: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @classmethod
    def plan(cls, store, params: TilingParams, tiling_id: str | None, slides: list[str] | None, shard: str | None, *,
             stain: str | None, stain_reference: str | None, opt) -> DecodeOnce:
        """Which slides to fuse; tiles the untiled ones first (run_tiling) when the settings do not allow fusing."""
        from hefeat.runner import shard_slides
        from hefeat.slides.run import prepare_tiling, run_tiling, tiling_spots, upsampling
        from hefeat.slides.run import tiling_id as tiling_id_of

        store.require()
        tid = tiling_id_of(params)
        if tiling_id and tiling_id != tid:
            raise HefeatError(f"--tiling {tiling_id} is not the tiling that --tile describes ({tid}); give one of them")
        table = store.slides(slides)
        if table.empty:
            raise HefeatError(f"No slides in {store.root}. Add some: hefeat ingest slides PATH...")
        spots = None
        if params.spots:
            spots, _, table = tiling_spots(store, table, slides)
        mine = shard_slides(table["slide_id"].tolist(), shard)
        upsampling(table.set_index("slide_id").loc[mine], params)  # refused before anything is written
        prepare_tiling(store, params)
        tiled = set(store.finished("tiling", tid)["slide_id"])
        untiled = [s for s in mine if s not in tiled]
        why = why_not(params, stain=stain, stain_reference=stain_reference, decode=opt.decode)
        plan = cls(params, tid, mine, [], table.set_index("slide_id"), spots, why, tiled_before=len(mine) - len(untiled))
        if not untiled:
            plan.why = "every slide of this run was tiled before"
        elif why is None:
            plan.fused = untiled
        else:  # tile now, embed after from a second read
            t = run_tiling(store, params, slides=untiled, fail_fast=opt.fail_fast, progress=opt.progress)
            plan.tiling = {"tiling_id": tid, "ok": len(t.ok), "already_done": len(t.done), "skipped": t.skipped,
                           "failed": t.failed, "busy": t.busy, "tiles": t.tiles, "run_id": t.extra.get("run_id")}
        return plan

    def sample_tiles(self, n: int) -> np.ndarray | None:
        """Up to `n` grid candidates of the first slide to fuse (precision calibration before any slide is tiled)."""
        from hefeat.slides.reader import open_catalog_slide

        for sid in self.fused[:4]:
            try:
                with open_catalog_slide(self.table.loc[sid], verify=False) as s:
                    if self.spots is not None:
                        cand = spot_candidates(s, self.spots[self.spots["slide_id"] == sid], self.params)
                    else:
                        cand = tile_candidates(s, self.params.for_slide(sid))[0]
                    xy = cand[["x", "y"]].to_numpy()[:n]
                    return np.stack([s.read(x, y, self.params.size, self.params.mpp) for x, y in xy])
            except Exception:  # noqa: BLE001  (the slide fails later with its own reason)
                continue
        return None

    def run(self, store, runner, enc, transform, tiling: dict, cfg, *, device: str, precision: str, tta: bool,
            dtype: str, opt, info: dict, tiles_digest: dict, timings: dict) -> None:
        """Tile and embed the fused slides through `runner` (the extraction's); counts what was read how often."""
        import torch

        from hefeat.extract.compute import check_finite, embed_batch, feature_attrs
        from hefeat.store.features import check_storable
        from hefeat.store.runs import record_run

        self.stats["tiles_read_twice"] = runner.summary.tiles  # embedded from tiles the tiling read before
        if not self.fused:
            return
        compute = [0.0]

        def embed(imgs: np.ndarray, start: int) -> np.ndarray:
            t = time.perf_counter()
            feats = embed_batch(enc, transform, torch.from_numpy(imgs), device=device, precision=precision, tta=tta)
            bad = check_finite(feats, start, precision)
            if bad:
                raise NonFiniteError(bad)
            raw = feats.cpu().numpy()
            with np.errstate(over="ignore"):
                rows = raw.astype(dtype, copy=False)
            check_storable(raw, rows, start)  # finite as stored (float16 overflow names --dtype float32)
            compute[0] += time.perf_counter() - t
            return rows

        t0 = time.perf_counter()
        st = run_fused(store, runner, self.params, self.fused, self.table, spots=self.spots, embed=embed,
                       batch_size=int(opt.batch_size), dtype=dtype,
                       attrs=lambda sid, size0: feature_attrs(cfg, tiling, runner.key, sid, size0, precision),
                       tiles_digest=tiles_digest, info=info, fail_fast=opt.fail_fast, progress=opt.progress)
        tsum = st.pop("tiling_summary")
        tsum.extra["tiling_id"] = self.tiling_id
        st["tiling"]["run_id"] = record_run(store, "tile", tsum.to_dict(), params=self.params.to_dict())
        self.tiling = st.pop("tiling")
        self.stats.update(st)
        timings["decode_once_s"] = round(time.perf_counter() - t0, 3)
        timings["decode_once_compute_s"] = round(compute[0], 3)

    def report(self) -> dict:
        """What the summary and run record say: used or why not, tiles read once / twice, read seconds saved."""
        return {"used": bool(self.fused), "why": None if self.fused else self.why,
                "tiles_read_once": self.stats.get("tiles_read_once", 0),
                "tiles_read_twice": self.stats.get("tiles_read_twice", 0),
                "tile_reads": self.stats.get("reads", 0), "read_s": self.stats.get("read_s", 0.0),
                "read_s_saved_est": self.stats.get("read_s_saved_est", 0.0),
                "tiling": self.tiling_summary()}

    def tiling_summary(self) -> dict:
        """This run's tiling side: slides tiled now (ok/skipped/failed/busy) and those tiled before (already_done)."""
        t = {"tiling_id": self.tiling_id, "ok": 0, "already_done": 0, "skipped": {}, "failed": {}, "busy": {}, "tiles": 0,
             **self.tiling}
        t["already_done"] += self.tiled_before
        return t
