"""Data access for stage 2: targets joined to slides/patients, transforms, train-only filters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store
from hefeat.store.features import slide_means

TRANSFORMS = ("log10p", "log1p", "log2p", "none")
ROW_BLOCK = 256  # sample rows per block when the targets are converted (no full-size temporaries)


def transform_values(v: np.ndarray, how: str) -> np.ndarray:
    """log10(1+x) (HE2RNA), log1p, log2(1+x), or none."""
    if how == "log10p":
        return np.log10(1 + v)
    if how == "log1p":
        return np.log1p(v)
    if how == "log2p":
        return np.log2(1 + v)
    if how == "none":
        return v
    raise HefeatError(f"Unknown transform {how!r}; use one of {', '.join(TRANSFORMS)}")


def transform_inplace(v: np.ndarray, how: str) -> None:
    """`transform_values` written over `v` (a float64 array): the same ufuncs in the same order, so the
    same bits, without the temporaries (1 + v and the result) of the copying version."""
    if how == "log1p":
        np.log1p(v, out=v)
    elif how in ("log10p", "log2p"):
        np.add(v, 1, out=v)
        (np.log10 if how == "log10p" else np.log2)(v, out=v)
    elif how != "none":
        raise HefeatError(f"Unknown transform {how!r}; use one of {', '.join(TRANSFORMS)}")


def _blocks(n: int, fn) -> list:
    """fn(a, b) over row blocks [a, b) of n rows, on every core: numpy's copies and ufuncs release the
    GIL, so threads split the element-wise work of a samples x genes matrix without copying it."""
    from hefeat.learn.threads import thread_map

    return thread_map(lambda ab: fn(*ab), [(a, min(n, a + ROW_BLOCK)) for a in range(0, n, ROW_BLOCK)])


def expression_table(store: Store, dataset: str = "expression", genes: list[str] | None = None) -> pd.DataFrame:
    """Wide targets: one row per sample_id (sorted), one column per gene (sorted, or `genes` in their order)."""
    from hefeat.store.expression import read_matrix

    known = store.sql("SELECT DISTINCT dataset FROM expression_matrix")["dataset"].tolist()
    if dataset not in known:
        raise HefeatError(f"No target table {dataset!r} in the store (have: {', '.join(known) or 'none'}); "
                          "ingest one with hefeat ingest expression")
    ids, cols, values = read_matrix(store, dataset, genes)  # the stored float matrix: no long rows, no pivot
    wide = pd.DataFrame(values.astype(np.float64), index=pd.Index(ids, name="sample_id"),
                        columns=pd.Index(cols, name="gene"))
    return wide if genes is not None else wide.sort_index(axis=1)


@dataclass
class SlideLevelData:
    """Rows = samples (or patients): ids, groups (patient), features X (n, d), targets Y (n, g)."""

    ids: np.ndarray
    groups: np.ndarray
    slides: list[list[str]]
    X: np.ndarray
    Y: np.ndarray
    genes: list[str]
    sites: np.ndarray


def sample_targets(store: Store, extraction_id: str, *, dataset: str = "expression", genes: list[str] | None = None,
                   level: str = "sample", transform: str = "log1p") -> SlideLevelData:
    """Targets per sample (or patient) whose slides have features in the extraction; X left empty (0 columns).

    level='patient' averages a patient's samples (targets) and lists all its slides.
    """
    if level not in ("sample", "patient"):
        raise HefeatError("level must be 'sample' or 'patient'")
    from hefeat.store.expression import read_matrix

    known = store.sql("SELECT DISTINCT dataset FROM expression_matrix")["dataset"].tolist()
    if dataset not in known:
        raise HefeatError(f"No target table {dataset!r} in the store (have: {', '.join(known) or 'none'}); "
                          "ingest one with hefeat ingest expression")
    if transform not in TRANSFORMS:
        transform_inplace(np.zeros(0), transform)  # the one-line error, before any work
    # The stored matrix read once into float64 and transformed batch by batch as it lands: no float32 copy of it, no
    # float64 DataFrame, no sorted copy (expression_table's columns); every sample in sorted gene order (the usual
    # case) is used as it is.
    def convert(v: np.ndarray) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):  # values it cannot take are named below
            transform_inplace(v, transform)

    sample_ids, gene_names, values = read_matrix(store, dataset, genes, dtype=np.float64, convert=convert)
    order = np.arange(len(gene_names)) if genes is not None else np.argsort(np.array(gene_names, str), kind="stable")
    bad = np.zeros(len(gene_names), bool)
    for part in _blocks(len(values), lambda a, b: ~np.isfinite(values[a:b]).all(0)):
        bad |= part
    if bad.any():  # NaN read (a missing value), or the transform's NaN/-inf (a log of 1 + x <= 0)
        names = [gene_names[j] for j in order if bad[j]]
        raise HefeatError(f"Targets of {dataset!r} are missing (NaN) or invalid under {transform} (a value <= -1) for "
                          f"{len(names)} genes: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}; impute or drop "
                          "them")
    sample_index = pd.Index(sample_ids)
    smap = store.sql("SELECT s.sample_id, s.slide_id, sl.patient_id, sl.site FROM samples s JOIN slides sl "
                     "USING (slide_id) WHERE s.dataset = ?", [dataset])
    done = set(finished_slides(store, extraction_id))
    smap = smap[smap["slide_id"].isin(done) & smap["sample_id"].isin(sample_index)]
    if smap.empty:
        raise HefeatError(f"No sample of {dataset!r} has a slide with features in extraction {extraction_id}")
    key = "sample_id" if level == "sample" else "patient_id"
    # Groups sorted by key; per group: its first row's patient and site, its slides (sorted, unique) and
    # the mean of its unique samples' transformed targets (vectorised: 10,000 groups in milliseconds).
    smap = smap.reset_index(drop=True)
    first = smap.drop_duplicates(key).sort_values(key, kind="stable")
    ids = first[key].to_numpy()
    gpos = pd.Index(ids).get_indexer(smap[key])
    sl = smap.assign(_g=gpos).drop_duplicates(["_g", "slide_id"]).sort_values(["_g", "slide_id"])
    cut = np.searchsorted(sl["_g"].to_numpy(), np.arange(1, len(ids)))
    slides = [a.tolist() for a in np.split(sl["slide_id"].to_numpy(), cut)]
    sm = smap.assign(_g=gpos).drop_duplicates(["_g", "sample_id"]).sort_values("_g", kind="stable")
    rows = sample_index.get_indexer(sm["sample_id"])
    sorted_cols = bool((order == np.arange(len(order))).all())
    same_rows = len(rows) == len(values) and bool((rows == np.arange(len(rows))).all())
    if same_rows and sorted_cols:
        Yt = values
    else:  # a subset or another order of samples or genes: gathered into place in row blocks
        Yt = np.empty((len(rows), len(order)))

        def fill(a: int, b: int) -> None:
            block = values[a:b] if same_rows else values[rows[a:b]]
            Yt[a:b] = block if sorted_cols else block[:, order]

        _blocks(len(rows), fill)
    values = None  # the full matrix is freed here when it was gathered (the closures above read it)
    starts = np.searchsorted(sm["_g"].to_numpy(), np.arange(len(ids)))
    sizes = np.diff(np.append(starts, len(Yt)))
    Y = Yt if (sizes == 1).all() else np.add.reduceat(Yt, starts, axis=0) / sizes[:, None]
    return SlideLevelData(ids=ids.astype(str), groups=first["patient_id"].to_numpy().astype(str), slides=slides,
                          X=np.zeros((len(ids), 0)), Y=Y, genes=[gene_names[j] for j in order],
                          sites=first["site"].astype(str).to_numpy())


def slide_level_data(store: Store, extraction_id: str, *, dataset: str = "expression", genes: list[str] | None = None,
                     level: str = "sample", transform: str = "log1p") -> SlideLevelData:
    """Mean embedding per slide joined to targets; a sample with several slides averages them.

    level='patient' averages samples (features and targets) per patient.
    """
    data = sample_targets(store, extraction_id, dataset=dataset, genes=genes, level=level, transform=transform)
    needed = sorted({s for ss in data.slides for s in ss})
    sids, M = slide_means(store, extraction_id, needed)
    pos = {s: i for i, s in enumerate(sids)}
    data.X = np.stack([M[[pos[s] for s in ss]].mean(0) for ss in data.slides]).astype(np.float64)
    return data


def train_gene_filter(Y_train: np.ndarray, *, min_variance: float = 0.01, median_positive: bool = False) -> np.ndarray:
    """Boolean mask of genes kept, computed on training targets only."""
    keep = Y_train.var(0, ddof=1) > min_variance
    if median_positive:
        keep &= np.median(Y_train, 0) > 0
    return keep


def median_shift(Y: np.ndarray, cohort: np.ndarray, fit_idx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """EMO's cross-cohort correction: shift each cohort by the difference of per-gene medians to the
    largest cohort, medians computed on `fit_idx` (train + validation) only; applies to all rows."""
    cohort = np.asarray(cohort).astype(str)
    fit_c = cohort[fit_idx]
    names, counts = np.unique(fit_c, return_counts=True)
    ref = names[np.argmax(counts)]
    ref_med = np.median(Y[fit_idx][fit_c == ref], 0)
    out = Y.copy()
    offsets = {}
    for c in np.unique(cohort):
        rows = fit_idx[fit_c == c]
        if c == ref or len(rows) == 0:
            offsets[c] = np.zeros(Y.shape[1])
            continue
        offsets[c] = ref_med - np.median(Y[rows], 0)
        out[cohort == c] += offsets[c]
    return out, offsets


def clinical_by_slide(store: Store) -> pd.DataFrame:
    """One row per slide: slide_id, patient_id, site and the clinical columns (slide- or patient-keyed table)."""
    slides = store.sql("SELECT slide_id, patient_id, site FROM slides")
    if "clinical" not in set(store.sql("SHOW TABLES")["name"]):
        return slides
    clin = store.sql("SELECT * FROM clinical")
    key = "slide_id" if "slide_id" in clin.columns else "patient_id"
    extra = clin.drop(columns=[c for c in ("slide_id", "patient_id", "site") if c in clin.columns and c != key])
    return slides.merge(extra, on=key, how="left")


# ---------------------------------------------------------------------------------------------
# Tiles: the one path every tile-level method reads embeddings through
# ---------------------------------------------------------------------------------------------
@dataclass
class SlideTiles:
    """One slide's tiles: metadata (tile_id, x, y and the columns asked for) and embeddings (n, dim)."""

    slide_id: str
    tiles: pd.DataFrame
    X: np.ndarray


def slide_tiles(store: Store, extraction_id: str, slides: list[str] | None = None, *,
                columns: tuple[str, ...] = ()) -> Iterator[SlideTiles]:
    """Stream (slide, tile metadata, embeddings) one finished slide at a time, through the store's reads.

    `columns` adds tile-table columns (row, col, density, spot_id, QC ...) joined on tile_id.
    """
    from hefeat.store.features import iter_slide_features

    tid = store.extraction(extraction_id)["tiling_id"]
    want = ["tile_id", "x", "y", *[c for c in columns if c not in ("tile_id", "x", "y")]]
    for sid, X in iter_slide_features(store, extraction_id, slides):
        t = store.tiles(tid, sid)
        missing = [c for c in want if c not in t.columns]
        if missing:
            raise HefeatError(f"Tiling {tid} has no column(s) {', '.join(missing)} (slide {sid})")
        t = t[want].reset_index(drop=True)
        if len(t) != len(X):
            raise HefeatError(f"Slide {sid}: {len(X)} embeddings but {len(t)} tiles in tiling {tid}; re-extract it")
        yield SlideTiles(sid, t, X)


def finished_slides(store: Store, extraction_id: str) -> list[str]:
    """Slides whose features are finished in an extraction (sorted)."""
    from hefeat.store.features import slide_table

    return sorted(slide_table(store, extraction_id).slide_ids)


# ---------------------------------------------------------------------------------------------
# Input fingerprints: a model id changes when any data it read changes (contract 2)
# ---------------------------------------------------------------------------------------------
CLINICAL_PARAMS = ("label", "cohort_col", "time_col", "event_col")


def input_fingerprints(store: Store, params) -> dict[str, str]:
    """Fingerprints of the inputs a method's params name: features, target tables, slides, clinical columns."""
    from hefeat.store import ids

    eid = getattr(params, "extraction_id", None)
    if eid:
        store.extraction(eid)
        used = finished_slides(store, eid)  # the slides this fit can read: their patients and sites matter
        fp: dict[str, str] = {"features": ids.extraction_fingerprint(store, eid),
                              "slides": ids.slide_set_fingerprint(store, used)}
    else:
        fp = {"slides": ids.slide_set_fingerprint(store)}
    known = None
    for name in ("dataset", "bulk_dataset"):
        ds = getattr(params, name, None)
        if ds:
            if known is None:
                known = set(store.sql("SELECT DISTINCT dataset FROM expression_matrix")["dataset"])
            if ds in known:
                fp[f"target:{ds}"] = ids.expression_fingerprint(store, ds)
    cols = sorted({v for n in CLINICAL_PARAMS if isinstance(v := getattr(params, n, None), str) and v and v != "site"})
    if cols and "clinical" in set(store.sql("SHOW TABLES")["name"]):
        have = set(store.sql("SELECT * FROM clinical LIMIT 0").columns)
        cols = [c for c in cols if c in have]
        if cols:
            fp["clinical"] = ids.clinical_fingerprint(store, cols)
    return fp
