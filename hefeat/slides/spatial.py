"""Spatial samples into the store: a reader's SpotSet (Visium, HEST-1k, ST) -> its slide + spots + spot diameter."""

from __future__ import annotations

import os
from pathlib import Path

from hefeat.errors import HefeatError
from hefeat.formats.spots import SpotSet
from hefeat.slides.reader import Slide
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


def ingest_spot_set(store: Store, ss: SpotSet, *, slide_id: str | None = None, mpp: float | None = None,
                    patient_id: str | None = None, replace: bool = False) -> IngestReport:
    """Register the section's H&E (µm/px from the data unless `mpp`) and write its spots, counts and spot diameter.

    Everything is read and checked (spot centres inside the image, counts finite) before the store changes.
    """
    store.require()
    if ss.image is None or not Path(ss.image).is_file():
        raise HefeatError(f"{ss.technology} sample {ss.sample}: image not found: {ss.image}")
    sid = check_id(slide_id or sanitize_id(ss.sample))
    use = check_mpp(mpp if mpp is not None else ss.mpp, f"{ss.technology} sample {ss.sample}") \
        if (mpp is not None or ss.mpp is not None) else None
    meta = {"slide_id": sid, **({"patient_id": patient_id} if patient_id else {})}
    notes = []
    with Slide(ss.image, mpp=use) as s:
        row = slide_row(s, Path(ss.image), meta, use is not None)
        w, h = s.dimensions
        stated = s.stated_mpp
    if use is not None:  # the data's own scale: the spot is a physical ruler in the image's pixels
        row["mpp_source"] = "--mpp" if mpp is not None else f"{ss.technology} spot geometry"
        if stated is not None and abs(use / stated.x - 1) > MPP_AGREE:
            notes.append(f"the image states {stated.x:.4g} µm/px ({stated.source}); using {use:.4g} from "
                         f"{row['mpp_source']} (recorded as the slide's mpp_source)")
        elif stated is not None:
            row["mpp_source"] = stated.source
    check_spot_set(ss.spots, ss.counts, ss.genes, width=w, height=h, where=f"{ss.technology} sample {ss.sample}")
    rep = register_slides(store, [(Path(ss.image), row, None)], n_files=1, replace=replace)
    sp = write_spot_set(store, sid, ss.spots, ss.counts, ss.genes, spot_diameter_um=ss.spot_diameter_um,
                        technology=ss.technology, source=ss.source)
    rep.kind = "spatial"
    rep.rows = sp.rows
    rep.notes += [*ss.notes, *notes, f"{len(ss.spots)} spots x {len(ss.genes)} genes on slide {sid} "
                  f"({ss.technology}, {ss.spot_diameter_um:g} µm spots, {row['mpp_x']:.4g} µm/px)"]
    return rep


def ingest_visium(store: Store, outs: str | os.PathLike, *, image: str | os.PathLike | None = None, **kw) -> IngestReport:
    """A Space Ranger outs/ folder and its full-resolution H&E (see hefeat.formats.visium)."""
    from hefeat.formats.visium import read_visium

    return ingest_spot_set(store, read_visium(outs, image), **kw)


def ingest_hest(store: Store, root: str | os.PathLike, samples: list[str] | None = None, **kw) -> IngestReport:
    """HEST-1k samples (all under root/st/ by default); each is read and checked before it is written."""
    from hefeat.formats.hest import read_hest, sample_ids

    ids = samples or sample_ids(root)
    if not ids:
        raise HefeatError(f"HEST: no st/*.h5ad under {root}")
    sets = [read_hest(root, s) for s in ids]  # read all first: a bad sample stops before any write
    total = IngestReport("spatial")
    for ss in sets:
        r = ingest_spot_set(store, ss, **kw)
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

    return ingest_spot_set(store, read_st(counts, spots, image, mpp=mpp), **kw)


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
