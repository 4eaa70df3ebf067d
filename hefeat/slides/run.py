"""Slides into the store: ingest (open, fingerprint, register) and tiling (the step run by the per-slide runner)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.runner import RunSummary, SlideTask, run_slides, shard_slides
from hefeat.slides.reader import Slide, open_catalog_slide  # noqa: F401  (re-exported)
from hefeat.slides.tiling import TilingParams, spot_tiles, tile_slide
from hefeat.store import ids, layout
from hefeat.store.atomic import clean_stale_tmp, write_json
from hefeat.store.catalog import Store
from hefeat.store.ids import frame_fingerprint
from hefeat.store.ingest import (
    MPP_AGREE,
    IngestReport,
    SlideManifest,
    check_mpp,
    register_slides,
    slide_row,
)
from hefeat.store.runs import record_run, timestamp
from hefeat.store.tables import write_parquet


def tiling_id(params: TilingParams) -> str:
    """Content-derived id of a tiling (formula in hefeat.store.ids) over the parameters that have an effect."""
    return ids.tiling_id(params.id_dict())


def slide_input_digest(row: pd.Series) -> str:
    """What a slide's tiles are computed from: its file fingerprint and level-0 MPP."""
    return f"{row['fingerprint']}:{float(row['mpp_x']):.6g}:{float(row['mpp_y']):.6g}"


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide")


def slide_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The given files, with each folder replaced by the slide files below it (a GDC download: <file id>/<name>.svs)."""
    out = []
    for x in paths:
        p = Path(x)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
                           and not q.name.startswith("."))
            if not found:
                raise HefeatError(f"No slide files ({', '.join(SLIDE_SUFFIXES[:5])} ...) under {p}")
            out += found
        else:
            out.append(p)
    return out


def _gdc_check(files: list[Path], manifest: str | os.PathLike, verify_md5: bool) -> tuple[list[str], dict[Path, str]]:
    """Every file a GDC manifest lists must be among `files`; (notes, md5 mismatches by file)."""
    from hefeat.formats import gdc

    m = gdc.read_manifest(manifest)
    by_name = {p.name: p for p in files}
    missing = [f for f in m["filename"] if f not in by_name]
    if missing:
        raise HefeatError(f"GDC manifest {Path(manifest).name}: field 'filename' lists {missing[0]}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, not among the given files; "
                          "download it (gdc-client download -m) or give its folder")
    extra = sorted(set(by_name) - set(m["filename"]))
    notes = [f"{len(extra)} files are not in the GDC manifest (ingested, unchecked): {', '.join(extra[:5])}"] if extra else []
    bad: dict[Path, str] = {}
    if verify_md5:
        for f, md5 in zip(m["filename"], m["md5"], strict=True):
            got = gdc.md5sum(by_name[f])
            if got != md5.strip().lower():
                bad[by_name[f]] = (f"md5 {got} differs from the manifest's {md5} (field 'md5' of "
                                   f"{Path(manifest).name}): incomplete or corrupted download")
    return notes, bad


def _sheet_meta(files: list[Path], sheet_path: str | os.PathLike) -> dict[Path, dict]:
    """patient_id from a GDC sample sheet's Case ID for each listed file; every listed file must be given,
    and a barcode in the file name must name the same case."""
    from hefeat.formats import gdc, tcga

    sheet = gdc.read_sample_sheet(sheet_path)
    by_name = {p.name: p for p in files}
    name = Path(sheet_path).name
    out: dict[Path, dict] = {}
    for r in sheet.drop_duplicates("File Name").to_dict("records"):
        p = by_name.get(r["File Name"])
        if p is None:
            raise HefeatError(f"GDC sample sheet {name}: field 'File Name' lists {r['File Name']}, not among the given "
                              "files; download it or drop its row")
        b = tcga.parse_slide_name(p)
        if b is not None and b.patient != r["Case ID"]:
            raise HefeatError(f"GDC sample sheet {name}: field 'Case ID' says {r['Case ID']} for {p.name}, whose "
                              f"barcode names {b.patient}")
        out[p] = {"patient_id": r["Case ID"]}
    return out


def ingest_slides(
    store: Store,
    paths: list[str | os.PathLike],
    *,
    mpp: float | None = None,
    manifest: str | os.PathLike | None = None,
    gdc_manifest: str | os.PathLike | None = None,
    sample_sheet: str | os.PathLike | None = None,
    verify_md5: bool = False,
    diagnostic_only: bool = False,
    fail_fast: bool = False,
    replace: bool = False,
    override_mpp: bool = False,
    progress: bool = False,
    threads: int = 4,
) -> IngestReport:
    """Register slide files: properties, MPP (and where it came from), fingerprint.

    Folders are searched for slide files. TCGA barcodes in file names (TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs)
    give slide_id (the barcode), patient_id (12 characters) and site (tissue source site); a
    manifest row overrides them. In a batch with barcodes, a file without one is its own patient
    (a warning names it). gdc_manifest: every listed file must be among the files (verify_md5:
    checked against the manifest's md5). sample_sheet (GDC): patient_id from its Case ID; a case in
    two projects, a listed file not given, or a Case ID the barcode contradicts is an error. diagnostic_only keeps DX (FFPE) slides only.
    Files are opened on `threads` threads (OpenSlide and hashing release the GIL); the catalog is
    written once, in one transaction (see hefeat.store.ingest.register_slides for re-ingest rules:
    unchanged slides are left alone, a corrected --mpp is applied, or needs replace=True once the
    slide has tiles). An --mpp (or manifest mpp) that contradicts the µm/px a slide states is refused
    unless `override_mpp`, and then recorded as an override of the stated value (mpp_source).
    """
    import warnings

    from tqdm import tqdm

    from hefeat.formats import tcga

    store.require()
    if not paths:
        raise HefeatError("No slide files given. Example: hefeat ingest slides data/demo/slides/*.tiff")
    if mpp is not None:
        mpp = check_mpp(mpp, "--mpp")
    m = SlideManifest(manifest) if manifest is not None else None
    files = slide_files(paths)
    bad_md5: dict[Path, str] = {}
    notes: list[str] = []
    if gdc_manifest is not None:
        notes, bad_md5 = _gdc_check(files, gdc_manifest, verify_md5)
    elif verify_md5:
        raise HefeatError("--verify-md5 needs --gdc-manifest (the md5 sums come from it)")
    barcodes = {p: tcga.slide_meta(p) for p in files}
    if sample_sheet is not None:
        for p, meta in _sheet_meta(files, sample_sheet).items():
            barcodes[p] = {**barcodes[p], **meta}
    if any(barcodes.values()):
        plain = [p for p, b in barcodes.items() if not b and not (m and m.row(p))]
        for p in plain:
            warnings.warn(f"{p.name} has no TCGA barcode in its name: ingested as its own patient", stacklevel=2)
        if plain:
            notes.append(f"{len(plain)} files without a TCGA barcode, each its own patient: "
                         f"{', '.join(p.name for p in plain[:5])}{' …' if len(plain) > 5 else ''}")
        if diagnostic_only:
            frozen = [p for p, b in barcodes.items() if b and not b["slide_id"].split("-")[-1].startswith("DX")]
            files = [p for p in files if p not in set(frozen)]
            if frozen:
                notes.append(f"{len(frozen)} frozen (TS/BS/MS) slides left out (--diagnostic-only): "
                             f"{', '.join(p.name.split('.')[0] for p in frozen[:5])}{' …' if len(frozen) > 5 else ''}")

    def probe(p: Path):
        meta = {**barcodes.get(p, {}), **(m.row(p) if m else {})}
        slide_mpp = meta.get("mpp", mpp)
        if p in bad_md5:
            return p, None, bad_md5[p]
        try:
            with Slide(p, mpp=slide_mpp) as s:
                row = slide_row(s, p, meta, slide_mpp is not None)
                row["mpp_source"] = resolve_mpp_source(s, p, slide_mpp, "mpp" in meta, override_mpp)
                check_mpp(s.mpp.x, p.name)  # whatever stated it: a file, --mpp or a manifest
                return p, row, None
        except HefeatError as e:
            return p, None, str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        probed = tqdm(pool.map(probe, files), total=len(files), disable=not progress, desc="slides")
        rep = register_slides(store, probed, n_files=len(files), fail_fast=fail_fast, replace=replace)
    rep.notes += notes
    if any(barcodes.values()):
        summary = tcga.summarize(tcga.slide_table(store.slides()))
        rep.notes += [t for t in (tcga.summary_text(summary), tcga.excluded_text(summary)) if t]
    return rep


def upsampling(table: pd.DataFrame, params: TilingParams) -> dict[str, float]:
    """slide_id -> upsampling factor of the slides (catalog rows) that `params` tiles finer than their level 0
    beyond the tolerance; one error naming them unless params.upsample asks for it."""
    from hefeat.slides.tiling import UPSAMPLE_TOLERANCE, check_resolution

    mpp = table["mpp_x"].astype(float)
    coarse = mpp[params.mpp < mpp * (1 - UPSAMPLE_TOLERANCE)]
    if coarse.empty:
        return {}
    if not params.upsample:
        names = ", ".join(f"{sid} ({v:g})" for sid, v in list(coarse.items())[:6]) + (" …" if len(coarse) > 6 else "")
        check_resolution(float(coarse.max()), params, f"{len(coarse)} slide(s) [{names}]: the coarsest")
    return {str(sid): round(float(v) / params.mpp, 3) for sid, v in coarse.items()}


def resolve_mpp_source(slide: Slide, path: Path, given: float | None, from_manifest: bool, override: bool) -> str:
    """Where a slide's level-0 µm/px comes from; refuses a given value that contradicts the file without `override`."""
    stated = slide.stated_mpp
    if given is None or stated is None:
        return slide.mpp.source
    where = "its manifest row's mpp" if from_manifest else "--mpp"
    if abs(float(given) / stated.x - 1) <= MPP_AGREE:
        return stated.source  # the same value: nothing is overridden
    if not override:
        raise HefeatError(f"{path.name} states {stated.x:.4g} µm/px ({stated.source}) but {where} says {float(given):g}; "
                          "pass --override-mpp to use yours instead (recorded with the slide), or drop it")
    return f"override of stated {stated.x:.4g} ({stated.source}) by {where}"


def prepare_tiling(store: Store, params: TilingParams) -> str:
    """The tiling's folder (stale temporaries cleaned) and its _tiling.json; returns its id."""
    tid = tiling_id(params)
    tdir = store.tiling_dir(tid)
    tdir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(tdir)
    meta = layout.tiling_meta_path(store.root, tid)
    if not meta.exists():
        write_json(meta, {"tiling_id": tid, "mpp": params.mpp, "size": params.size, "background": params.background,
                          "spots": params.spots, "created": timestamp(), "params": params.to_dict()})
    return tid


def write_slide_tiles(store: Store, tid: str, sid: str, df: pd.DataFrame) -> dict:
    """Write one slide's tiles Parquet atomically (step 1 of its commit); n_tiles and digest for its record."""
    df.insert(0, "slide_id", sid)
    df.insert(0, "tiling_id", tid)
    write_parquet(df, store.tiles_path(tid, sid), kind="tiles")
    return {"n_tiles": len(df), "digest": frame_fingerprint(df)}


def tiling_spots(store: Store, table: pd.DataFrame, slides: list[str] | None):
    """(spots of the store, slides without spots, the slide table restricted to slides with spots) for a spot tiling."""
    spots = store.sql("SELECT slide_id, spot_id, x, y FROM spots")
    have = set(spots["slide_id"])
    no_spots = sorted(set(table["slide_id"]) - have)
    if slides and no_spots:
        raise HefeatError(f"Slides without spots cannot get a spot tiling: {', '.join(no_spots)}. Ingest spots first.")
    if not have:
        raise HefeatError("No spots in the store. Ingest them first: hefeat ingest spots spots.parquet")
    return spots, no_spots, table[table["slide_id"].isin(have)]


def run_tiling(
    store: Store,
    params: TilingParams,
    *,
    slides: list[str] | None = None,
    shard: str | None = None,
    fail_fast: bool = False,
    progress: bool = False,
    threads: int | None = None,
    qc_thumbnails: bool = False,
) -> RunSummary:
    """Tile the store's slides (or `slides`) with `params`; skips slides already tiled.

    qc_thumbnails writes reports/qc-<tiling>/<slide>.png (thumbnail, mask outline, tiles) per tiled slide.
    """
    store.require()
    tid = tiling_id(params)
    table = store.slides(slides)
    if table.empty:
        raise HefeatError(f"No slides in {store.root}. Add some: hefeat ingest slides PATH...")
    if params.overrides:  # a manifest row for a slide the store does not have is a typo, not a new tiling
        known = set((table if slides is None else store.slides())["slide_id"])
        unknown = sorted({sid for sid, _ in params.overrides} - known)
        if unknown:
            raise HefeatError(f"The tiling manifest names slides that are not in the store: {', '.join(unknown[:8])}"
                              f"{' …' if len(unknown) > 8 else ''}; fix the slide_id column or ingest them first")
    spots = None
    no_spots: list[str] = []
    if params.spots:
        spots, no_spots, table = tiling_spots(store, table, slides)
    table = table.set_index("slide_id")
    todo = shard_slides(list(table.index), shard)
    upsampled = upsampling(table.loc[todo], params)

    prepare_tiling(store, params)

    def step(task: SlideTask) -> dict:
        sid = task.slide_id
        row = table.loc[sid]
        with open_catalog_slide(row) as slide:
            tissue = None
            if params.spots:
                df = spot_tiles(slide, spots[spots["slide_id"] == sid], params, threads=threads)
            else:
                df, tissue = tile_slide(slide, params.for_slide(sid), threads=threads)
            if qc_thumbnails:
                from hefeat.slides.qc_thumbnail import write_qc_thumbnail

                write_qc_thumbnail(slide, tissue, df, store.qc_thumbnail_path(tid, sid))
        out = write_slide_tiles(store, tid, sid, df)
        if sid in upsampled:  # asked for (--allow-upsample): recorded with the slide
            out["upsampled"] = upsampled[sid]
        return out

    summary = run_slides(store, "tiling", tid, todo, step, fail_fast=fail_fast, progress=progress,
                         desc=f"tiling {tid}", input_digest=lambda sid: slide_input_digest(table.loc[sid]))
    if no_spots:
        summary.extra["without_spots"] = no_spots
    if upsampled:
        summary.extra["upsampled"] = upsampled
    summary.extra["tiling_id"] = tid
    summary.extra["run_id"] = record_run(store, "tile", summary.to_dict(), params=params.to_dict())
    return summary
