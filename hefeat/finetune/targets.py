"""What each task trains on: samples (tiles or spot patches of a tiling), their targets, and the units
(slides or samples, grouped by patient) that the split assigns to folds.

- spots (ST-Net): one sample per spot patch of a spot tiling; target = log((counts + 1) / spot total)
  of the selected genes (hefeat.learn.spots.spot_targets); units = slides.
- genes (EMO): every tile of a sample's slides carries the sample's transformed bulk expression;
  units = samples, in the order `hefeat fit genes` uses, so the same split spec gives the same folds.
- classify (PathoMCH, receptors): every tile carries its slide's label; trait labels are "above the
  cohort median"; slides between the exclude_mid percentiles keep their label for evaluation but are
  never trained on; units = slides.

Each loader is its task's `load` in the task registrations (tasks.py; `tasks.load_task` picks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.catalog import Store

if TYPE_CHECKING:
    from hefeat.finetune.recipe import Recipe


@dataclass
class TaskData:
    """Samples (rows: slide_id, tile_id, x, y, unit), targets and units of one job.

    train_targets (n_samples, n_out): NaN where a sample must not train that output. unit_targets
    (n_units, n_out): what evaluation compares unit predictions with (spots: unused, targets are per
    sample). kind: regression | binary | multiclass (then n_out = classes, targets hold class index).
    """

    samples: pd.DataFrame
    train_targets: np.ndarray
    outputs: list[str]
    units: pd.DataFrame
    unit_targets: np.ndarray
    kind: str
    tiling: dict
    slides: pd.DataFrame
    variance_filter: bool = False
    info: dict = field(default_factory=dict)

    @property
    def unit_of(self) -> np.ndarray:
        """(n_samples,) row of each sample's unit in `units`."""
        return self.samples["unit"].to_numpy(np.int64)


def tiled_slides(store: Store, tiling_id: str) -> list[str]:
    """Slides tiled OK in a tiling, sorted."""
    q = "SELECT slide_id FROM status WHERE stage = 'tiling' AND id = ? AND state = 'ok' ORDER BY 1"
    return store.sql(q, [tiling_id])["slide_id"].tolist()


def pick_tiling(store: Store, tiling_id: str | None, *, spots: bool) -> dict:
    """The recipe's tiling, or the store's only tiling of the right kind (spot / tile)."""
    if tiling_id:
        t = store.tiling(tiling_id)
        if bool(t.get("spots")) != spots:
            need = "a spot tiling (hefeat tile --spots)" if spots else "a tile tiling, not a spot tiling"
            raise HefeatError(f"Tiling {tiling_id} is the wrong kind: this task needs {need}")
        return t
    t = store.sql("SELECT tiling_id FROM tilings WHERE " + ("" if spots else "NOT ") + "spots ORDER BY created")
    if len(t) != 1:
        what = "spot tilings" if spots else "tilings"
        raise HefeatError(f"The store has {len(t)} {what}; set tiling_id in the recipe (or --tiling)")
    return store.tiling(str(t["tiling_id"].iloc[0]))


def _tiles(store: Store, tiling_id: str, slides: list[str]) -> pd.DataFrame:
    parts = [store.tiles(tiling_id, s).assign(slide_id=s) for s in slides]
    if not parts:
        raise HefeatError(f"No slide is tiled in tiling {tiling_id}; run hefeat tile first")
    return pd.concat(parts, ignore_index=True)


def _cap_tiles(tiles: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    if not cap:
        return tiles
    rng = np.random.default_rng(seed)
    keep = [g.index[np.sort(rng.choice(len(g), cap, replace=False))] if len(g) > cap else g.index
            for _, g in tiles.groupby("slide_id", sort=True)]
    return tiles.loc[np.concatenate(keep)].reset_index(drop=True)


def select_genes(names: list[str], Y: np.ndarray, spec: str) -> np.ndarray:
    """Column indices: 'top:N' (highest mean), 'all', a file with one gene per line, or 'A,B,C'."""
    kind, _, n = spec.partition(":")
    if kind == "top":
        return np.argsort(-Y.mean(0), kind="stable")[: int(n or 250)]
    if kind == "all":
        return np.arange(len(names))
    wanted = Path(spec).read_text().split() if Path(spec).is_file() else [g.strip() for g in spec.split(",") if g.strip()]
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise HefeatError(f"Genes not in the targets: {', '.join(missing[:10])}")
    return np.array([names.index(g) for g in wanted])


def _slides_table(store: Store, slide_ids) -> pd.DataFrame:
    return store.slides(sorted(set(slide_ids)))[["slide_id", "patient_id", "site", "path", "mpp_x", "fingerprint"]]


def load_spots(store: Store, r: Recipe) -> TaskData:
    """TaskData of task spots (see the module docstring); clear errors when what it needs is missing."""
    from hefeat.learn.spots import spot_targets

    tiling = pick_tiling(store, r.tiling_id, spots=True)
    counts = store.sql("SELECT slide_id, spot_id, gene, count FROM spot_counts")
    if counts.empty:
        raise HefeatError("No spot counts in the store (missing labels for task spots); ingest them with hefeat ingest spots")
    wide = counts.pivot_table(index=["slide_id", "spot_id"], columns="gene", values="count", aggfunc="first")
    tiles = _tiles(store, tiling["tiling_id"], tiled_slides(store, tiling["tiling_id"]))
    tiles = tiles[pd.MultiIndex.from_frame(tiles[["slide_id", "spot_id"]]).isin(wide.index)].reset_index(drop=True)
    if tiles.empty:
        raise HefeatError(f"No spot patch of tiling {tiling['tiling_id']} has counts (spot ids do not match)")
    C = wide.loc[pd.MultiIndex.from_frame(tiles[["slide_id", "spot_id"]])].to_numpy(float)
    Y = spot_targets(np.nan_to_num(C))
    names = [str(c) for c in wide.columns]
    cols = select_genes(names, Y, r.genes or "top:250")
    slides = _slides_table(store, tiles["slide_id"])
    units = slides[["slide_id", "patient_id", "site"]].rename(columns={"slide_id": "unit_id"}).reset_index(drop=True)
    tiles["unit"] = tiles["slide_id"].map({s: i for i, s in enumerate(units["unit_id"])})
    tiles = tiles.merge(slides[["slide_id", "patient_id"]], on="slide_id", how="left")
    return TaskData(samples=tiles, train_targets=Y[:, cols].astype(np.float32), outputs=[names[i] for i in cols],
                    units=units, unit_targets=np.zeros((len(units), len(cols)), np.float32), kind="regression",
                    tiling=tiling, slides=slides, info={"target": "log((counts + 1) / spot total)"})


def load_genes(store: Store, r: Recipe) -> TaskData:
    """TaskData of task genes (see the module docstring); clear errors when what it needs is missing."""
    from hefeat.learn.data import expression_table, transform_values

    tiling = pick_tiling(store, r.tiling_id, spots=False)
    wide = expression_table(store, r.dataset)
    smap = store.sql("SELECT s.sample_id, s.slide_id, sl.patient_id, sl.site FROM samples s JOIN slides sl "
                     "USING (slide_id) WHERE s.dataset = ?", [r.dataset])
    smap = smap[smap["slide_id"].isin(tiled_slides(store, tiling["tiling_id"])) & smap["sample_id"].isin(wide.index)]
    smap = smap.drop_duplicates("slide_id").sort_values(["sample_id", "slide_id"]).reset_index(drop=True)
    if smap.empty:
        raise HefeatError(f"No sample of {r.dataset!r} has a slide tiled in {tiling['tiling_id']} (missing labels)")
    units = smap.groupby("sample_id", sort=True).agg(patient_id=("patient_id", "first"), site=("site", "first"))
    units = units.reset_index().rename(columns={"sample_id": "unit_id"})
    Yall = transform_values(wide.loc[units["unit_id"]].to_numpy(float), r.transform)
    if np.isnan(Yall).any():
        raise HefeatError(f"Targets of {r.dataset!r} contain NaN (samples missing genes); impute or drop them")
    names = [str(c) for c in wide.columns]
    cols = select_genes(names, Yall, r.genes or "all")
    Y = Yall[:, cols]
    tiles = _cap_tiles(_tiles(store, tiling["tiling_id"], smap["slide_id"].tolist()), r.max_tiles_per_slide, r.seed)
    unit_pos = {u: i for i, u in enumerate(units["unit_id"])}
    tiles["unit"] = tiles["slide_id"].map(dict(zip(smap["slide_id"], smap["sample_id"].map(unit_pos), strict=True)))
    tiles = tiles.merge(smap[["slide_id", "patient_id"]], on="slide_id", how="left")
    return TaskData(samples=tiles, train_targets=Y[tiles["unit"].to_numpy()].astype(np.float32),
                    outputs=[names[i] for i in cols], units=units, unit_targets=Y.astype(np.float64),
                    kind="regression", tiling=tiling, slides=_slides_table(store, tiles["slide_id"]),
                    variance_filter=True, info={"target": f"{r.transform} of {r.dataset}"})


def load_classify(store: Store, r: Recipe) -> TaskData:
    """TaskData of task classify (see the module docstring); clear errors when what it needs is missing."""
    from hefeat.learn.data import clinical_by_slide, expression_table
    from hefeat.learn.traits import patient_parts, patient_trait_values

    tiling = pick_tiling(store, r.tiling_id, spots=False)
    slides = tiled_slides(store, tiling["tiling_id"])
    units = store.slides(slides)[["slide_id", "patient_id", "site"]].rename(columns={"slide_id": "unit_id"})
    labels, train = [], []
    classes: list[str] | None = None
    for lab in r.labels:
        kind, _, name = lab.partition(":")
        if kind == "trait":
            wide = expression_table(store, r.dataset)
            if name not in wide.columns:
                raise HefeatError(f"Missing labels: trait {name!r} is not in the expression table {r.dataset!r}")
            # By patient, exactly as `hefeat fit traits`: one value per patient, high = above the
            # patients' median, OOD = the patient's percentile among patients; slides inherit it.
            _, per_patient = patient_trait_values(store, r.dataset, [name], units["unit_id"], wide=wide)
            pp = patient_parts(per_patient[name], set(), r.exclude_mid or (0.0, 100.0))
            pat = units["patient_id"].astype(str)
            y = pat.map(pp["label"].astype(float)).to_numpy(float)
            t = y.copy()
            if r.exclude_mid is not None:
                t[pat.map(pp["part"]).isin(["ood", "ood_near"]).to_numpy()] = np.nan
        else:
            clin = clinical_by_slide(store)
            if name not in clin.columns:
                raise HefeatError(f"Missing labels: {name!r} is not a column of the clinical table")
            raw = units["unit_id"].map(clin.set_index("slide_id")[name])
            cats = sorted(raw.dropna().astype(str).unique())
            if len(cats) > 2:
                if len(r.labels) > 1:
                    raise HefeatError(f"Label {name} has {len(cats)} classes: a multi-class label must be the only label")
                classes = [f"{name}={c}" for c in cats]
            y = raw.map(lambda x, cats=cats: cats.index(str(x)) if pd.notna(x) else np.nan).to_numpy(float)
            t = y.copy()
        if np.isnan(t).all() or len(np.unique(t[~np.isnan(t)])) < 2:
            raise HefeatError(f"Missing labels: {lab} gives no slides of both classes to train on")
        labels.append(y)
        train.append(t)
    U = np.stack(labels, 1)
    T = np.stack(train, 1)
    keep = ~np.isnan(U).all(1)
    units, U, T = units[keep].reset_index(drop=True), U[keep], T[keep]
    tiles = _cap_tiles(_tiles(store, tiling["tiling_id"], units["unit_id"].tolist()), r.max_tiles_per_slide, r.seed)
    tiles["unit"] = tiles["slide_id"].map({u: i for i, u in enumerate(units["unit_id"])})
    tiles = tiles.merge(units[["unit_id", "patient_id"]].rename(columns={"unit_id": "slide_id"}), on="slide_id")
    kind = "multiclass" if classes else "binary"
    return TaskData(samples=tiles, train_targets=T[tiles["unit"].to_numpy()].astype(np.float32),
                    outputs=classes or [lab.partition(":")[2] for lab in r.labels], units=units,
                    unit_targets=U, kind=kind, tiling=tiling, slides=_slides_table(store, tiles["slide_id"]),
                    info={"labels": list(r.labels), "exclude_mid": r.exclude_mid})
