"""Spatial samples into the store: a reader's SpotSet (Visium, HEST-1k, ST) -> its slide + spots + spot diameter."""

from __future__ import annotations

import os
from pathlib import Path

from hefeat.errors import HefeatError
from hefeat.formats.spots import SpotSet
from hefeat.slides.reader import MPP, Slide
from hefeat.store.catalog import Store
from hefeat.store.ids import check_id, sanitize_id
from hefeat.store.ingest import (
    MPP_AGREE,
    IngestReport,
    check_mpp,
    check_spot_set,
    register_slides,
    slide_row,
    write_spot_set,
)

# A µm/px the data derive from their spot geometry (Visium 55 µm / spot_diameter_fullres, HEST's metadata,
# the ST pitch) is a measurement: within 5 % of what the image states it confirms the stated value (kept);
# further off, one of the two is wrong and only --override-mpp makes the spot geometry win.
SPOT_GEOMETRY_AGREE = 0.05


def spot_set_mpp(ss: SpotSet, stated: MPP | None, mpp: float | None, override_mpp: bool) -> tuple[MPP, list[str]]:
    """(µm/px with its source, notes) of a spatial sample's image, by the rule `hefeat ingest slides` follows.

    The image's stated µm/px is kept unless --mpp (`mpp`) or the data's spot geometry contradicts it and
    `override_mpp` is given; then the override is recorded as such. Without a stated value, --mpp or
    else the spot geometry gives it.
    """
    what = f"{ss.technology} sample {ss.sample}"
    img = Path(ss.image).name
    geometry = f"{ss.mpp_from} ({ss.technology})"
    if mpp is not None:
        value, by, agree = check_mpp(mpp, "--mpp"), "--mpp", MPP_AGREE
    elif ss.mpp is not None:
        value, by, agree = check_mpp(ss.mpp, what), geometry, SPOT_GEOMETRY_AGREE
    else:
        if stated is None:
            raise HefeatError(f"{what}: neither the data nor the image {img} state µm/px; pass --mpp")
        return stated, []
    if stated is None:
        return MPP(value, value, by), []
    off = value / stated.x - 1
    if abs(off) <= MPP_AGREE:
        return stated, []
    if abs(off) <= agree:
        return stated, [f"{by} gives {value:.4g} µm/px, {off:+.1%} from the {stated.x:.4g} the image "
                        f"states ({stated.source}): the image's value kept"]
    if not override_mpp:
        keep = "drop --mpp" if mpp is not None else f"pass --mpp {stated.x:.4g} to keep the image's"
        raise HefeatError(f"{what}: the image {img} states {stated.x:.4g} µm/px ({stated.source}) but {by} says "
                          f"{value:.4g}; pass --override-mpp to use {by} instead (recorded with the slide), or {keep}")
    return MPP(value, value, f"override of stated {stated.x:.4g} ({stated.source}) by {by}"), [
        f"the image states {stated.x:.4g} µm/px ({stated.source}); using {value:.4g} from {by} (--override-mpp, "
        "recorded as the slide's mpp_source)"]


def _prepare(store: Store, ss: SpotSet, *, slide_id: str | None, mpp: float | None, override_mpp: bool,
             patient_id: str | None) -> tuple[dict, list[str]]:
    """The slide's catalog row and notes; every check (image, µm/px, spots) done, nothing written."""
    store.require()
    if ss.image is None or not Path(ss.image).is_file():
        raise HefeatError(f"{ss.technology} sample {ss.sample}: image not found: {ss.image}")
    sid = check_id(slide_id or sanitize_id(ss.sample))
    patient_id = patient_id or ss.patient
    meta = {"slide_id": sid, **({"patient_id": patient_id} if patient_id else {})}
    probe = mpp if mpp is not None else ss.mpp  # opens images that state nothing; replaced by the resolved value
    with Slide(ss.image, mpp=probe) as s:
        use, notes = spot_set_mpp(ss, s.stated_mpp, mpp, override_mpp)
        row = slide_row(s, Path(ss.image), meta, True)
        w, h = s.dimensions
    row.update({"mpp_x": use.x, "mpp_y": use.y, "mpp_source": use.source})
    check_spot_set(ss.spots, ss.counts, ss.genes, width=w, height=h, where=f"{ss.technology} sample {ss.sample}")
    return row, notes


def _write(store: Store, ss: SpotSet, row: dict, notes: list[str], replace: bool) -> IngestReport:
    sid = row["slide_id"]
    rep = register_slides(store, [(Path(ss.image), row, None)], n_files=1, replace=replace)
    sp = write_spot_set(store, sid, ss.spots, ss.counts, ss.genes, spot_diameter_um=ss.spot_diameter_um,
                        technology=ss.technology, source=ss.source)
    rep.kind = "spatial"
    rep.rows = sp.rows
    rep.notes += [*ss.notes, *notes, f"{len(ss.spots)} spots x {len(ss.genes)} genes on slide {sid} "
                  f"({ss.technology}, {ss.spot_diameter_um:g} µm spots, {row['mpp_x']:.4g} µm/px, {row['mpp_source']})"]
    return rep


def ingest_spot_set(store: Store, ss: SpotSet, *, slide_id: str | None = None, mpp: float | None = None,
                    override_mpp: bool = False, patient_id: str | None = None, replace: bool = False) -> IngestReport:
    """Register the section's H&E and write its spots, counts and spot diameter.

    µm/px: what the image states, unless --mpp or the data's own scale (spot geometry, metadata)
    contradicts it and `override_mpp` is given (see spot_set_mpp); else --mpp or the data's. Everything is read and checked (µm/px, spot centres inside the image, counts finite)
    before the store changes.
    """
    row, notes = _prepare(store, ss, slide_id=slide_id, mpp=mpp, override_mpp=override_mpp, patient_id=patient_id)
    return _write(store, ss, row, notes, replace)


def ingest_visium(store: Store, outs: str | os.PathLike, *, image: str | os.PathLike | None = None, **kw) -> IngestReport:
    """A Space Ranger outs/ folder and its full-resolution H&E (see hefeat.formats.visium)."""
    from hefeat.formats.visium import read_visium

    return ingest_spot_set(store, read_visium(outs, image), **kw)


def ingest_hest(store: Store, root: str | os.PathLike, samples: list[str] | None = None, *, override_mpp: bool = False,
                replace: bool = False) -> IngestReport:
    """HEST-1k samples (all under root/st/ by default); each is read and checked before any is written."""
    from hefeat.formats.hest import read_hest, sample_ids

    ids = samples or sample_ids(root)
    if not ids:
        raise HefeatError(f"HEST: no st/*.h5ad under {root}")
    sets = [read_hest(root, s) for s in ids]
    ready = [(ss, *_prepare(store, ss, slide_id=None, mpp=None, override_mpp=override_mpp, patient_id=None))
             for ss in sets]  # a bad sample (file, field, µm/px) stops before any write
    total = IngestReport("spatial")
    for ss, row, notes in ready:
        r = _write(store, ss, row, notes, replace)
        total.added += r.added
        total.unchanged += r.unchanged
        total.updated += r.updated
        total.rows += r.rows
        total.notes += r.notes
    return total


def ingest_st(store: Store, counts: str | os.PathLike, spots: str | os.PathLike, image: str | os.PathLike, *,
              mpp: float | None = None, **kw) -> IngestReport:
    """An original-format ST section (counts with XxY ids + spot detector table + H&E; see hefeat.formats.st)."""
    from hefeat.formats.st import read_st

    return ingest_spot_set(store, read_st(counts, spots, image, mpp=mpp), mpp=mpp, **kw)


def spot_patch_px(store: Store, mpp: float, slides: list[str] | None = None) -> int | None:
    """Tile size (px at `mpp`) equal to the spot diameter recorded for the spot slides; None when none is recorded.

    Slides whose technologies differ in spot size need an explicit size (or one tiling per technology).
    """
    d = store.sql("SELECT m.slide_id, m.spot_diameter_um FROM spot_meta m JOIN spots s USING (slide_id) "
                  "GROUP BY ALL")
    if slides:
        d = d[d["slide_id"].isin(slides)]
    diam = sorted(set(d["spot_diameter_um"].round(3)))
    if not diam:
        return None
    if len(diam) > 1:
        raise HefeatError(f"Spot slides have different spot diameters ({', '.join(f'{x:g}' for x in diam)} µm); "
                          "pass --size, or tile each technology's slides apart with --slides")
    return max(8, int(round(diam[0] / mpp)))
