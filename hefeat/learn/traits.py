"""PathoMCH-style binary trait maps, heterogeneity index and survival (Levy-Jurgenson et al. 2020).

Per trait: slides above the cohort median are "high"; slides between two percentiles are kept out of
training as out-of-distribution (OOD-near: within 10 points of the cut-offs; OOD-all). A subject-level
10 % test set, then 5 random train/validation splits; a tile classifier on frozen embeddings (every
tile inherits its slide's label); slide score = share of tiles called positive; the ensemble is a
per-tile majority vote of the 3 best models. Binary tile maps of several traits give cartographies
and the heterogeneity index (hti.py), which joins clinical data for Kaplan–Meier and log-rank.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.aggregate import majority_vote
from hefeat.learn.classifiers import tile_classifier
from hefeat.learn.data import clinical_by_slide, expression_table, transform_values
from hefeat.learn.hti import combination_codes, hti
from hefeat.learn.models import (
    load_model,
    load_table,
    model_exists,
    model_id,
    model_summary,
    save_model,
)
from hefeat.learn.splits import assert_disjoint, group_holdout
from hefeat.store.catalog import Store
from hefeat.store.features import read_features
from hefeat.store.tables import write_parquet


@dataclass
class TraitsParams:
    """Parameters of `hefeat fit traits` (recorded with the model)."""

    extraction_id: str
    traits: list[str] = field(default_factory=lambda: ["MKI67", "miR-17"])
    dataset: str = "expression"
    exclude_mid: list[float] = field(default_factory=lambda: [20.0, 80.0])
    splits: int = 5
    test_share: float = 0.1
    val_share: float = 0.2
    head: str = "logistic"
    ensemble: int = 3
    max_tiles_per_slide: int = 500
    seed: int = 0


def _slide_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def fit_traits(store: Store, p: TraitsParams, *, force: bool = False) -> dict:
    """Fit trait tile classifiers; write binary tile maps (ensemble) for every slide; AUCs per trait."""
    t0 = time.perf_counter()
    pdict = asdict(p)
    mid = model_id("traits", pdict)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True)
    ext = store.extraction(p.extraction_id)
    lo, hi = p.exclude_mid
    if not 0 <= lo < 50 < hi <= 100:
        raise HefeatError("--exclude-mid must be two percentiles around the median, e.g. 20,80")
    wide = expression_table(store, p.dataset)
    missing = [t for t in p.traits if t not in wide.columns]
    if missing:
        raise HefeatError(f"Traits not in the expression table {p.dataset!r}: {', '.join(missing)}")
    smap = store.sql("SELECT s.sample_id, s.slide_id, sl.patient_id FROM samples s JOIN slides sl USING (slide_id) "
                     "WHERE s.dataset = ?", [p.dataset])
    done = set(store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ?", [p.extraction_id])["slide_id"])
    smap = smap[smap["slide_id"].isin(done)].drop_duplicates("slide_id").reset_index(drop=True)
    if len(smap) < 10:
        raise HefeatError(f"Trait models need at least 10 slides with features and expression, found {len(smap)}")
    rng = np.random.default_rng(p.seed)
    feats, tile_ids = {}, {}
    for sid in smap["slide_id"]:
        F = read_features(store.features_path(p.extraction_id, sid))
        keep = np.sort(rng.choice(len(F), min(len(F), p.max_tiles_per_slide), replace=False))
        feats[sid], tile_ids[sid] = F, keep
    patients = smap["patient_id"].to_numpy().astype(str)
    rows, maps = [], {}
    for trait in p.traits:
        v = transform_values(wide.loc[smap["sample_id"], trait].to_numpy(float), "log1p")
        pct = pd.Series(v).rank(pct=True).to_numpy() * 100
        label = (v > np.median(v)).astype(int)
        ood_all = (pct > lo) & (pct <= hi)
        ood_near = ((pct > lo) & (pct <= lo + 10)) | ((pct > hi - 10) & (pct <= hi))
        extreme = np.flatnonzero(~ood_all)
        test = extreme[group_holdout(patients[extreme], p.test_share, seed=p.seed).test]
        # Test patients never train: drop every slide of theirs from the training pool.
        test_pat = set(patients[test])
        pool = np.array([i for i in extreme if patients[i] not in test_pat])
        models = []
        for s in range(p.splits):
            f = group_holdout(patients[pool], p.val_share, seed=p.seed + 1 + s)
            tr, va = pool[f.train], pool[f.test]
            assert_disjoint(patients, tr, va, test)
            if len(np.unique(label[tr])) < 2:
                continue
            Xtr = np.concatenate([feats[smap.at[i, "slide_id"]][tile_ids[smap.at[i, "slide_id"]]] for i in tr])
            ytr = np.concatenate([np.full(len(tile_ids[smap.at[i, "slide_id"]]), label[i]) for i in tr])
            clf = tile_classifier(p.head, C=0.05, seed=p.seed + s, max_iter=2000).fit(Xtr, ytr)
            val_auc = _slide_auc(label[va], np.array([_frac_pos(clf, feats[smap.at[i, "slide_id"]]) for i in va]))
            models.append((val_auc if np.isfinite(val_auc) else 0.0, s, clf))
        if not models:
            raise HefeatError(f"Trait {trait}: no split had both classes in training")
        models.sort(key=lambda m: -m[0])
        best = models[: p.ensemble]
        votes = {sid: majority_vote(np.stack([clf.predict(F) for _, _, clf in best])) for sid, F in feats.items()}
        score = np.array([votes[sid].mean() for sid in smap["slide_id"]])
        single = np.array([_frac_pos(best[0][2], feats[sid]) for sid in smap["slide_id"]])
        unseen = np.union1d(test, np.flatnonzero(ood_all))  # every slide no model trained or chose on
        rows.append({"trait": trait, "test_auc": _slide_auc(label[test], score[test]),
                     "heldout_auc": _slide_auc(label[unseen], score[unseen]), "n_heldout": len(unseen),
                     "test_auc_best_single": _slide_auc(label[test], single[test]),
                     "ood_near_auc": _slide_auc(label[ood_near], score[ood_near]),
                     "ood_all_auc": _slide_auc(label[ood_all], score[ood_all]),
                     "val_auc_best": best[0][0], "n_train_slides": len(pool), "n_test": len(test),
                     "n_ood_all": int(ood_all.sum()), "n_ood_near": int(ood_near.sum()), "models": len(models),
                     "split": f"subject test {p.test_share:g} + {p.splits} train/val seed={p.seed}"})
        for sid in smap["slide_id"]:
            maps.setdefault(sid, {})[trait] = votes[sid]
        smap[f"label_{trait}"] = label
        smap[f"part_{trait}"] = np.where(np.isin(np.arange(len(smap)), test), "test",
                                          np.where(ood_all, np.where(ood_near, "ood_near", "ood"), "train_val"))
        smap[f"score_{trait}"] = score
    metrics = pd.DataFrame(rows)
    tid = ext["tiling_id"]
    for sid, tr in maps.items():
        t = store.tiles(tid, sid)[["tile_id", "x", "y", "row", "col"]].reset_index(drop=True)
        B = np.stack([tr[x] for x in p.traits], 1)
        df = pd.concat([t, pd.DataFrame(B, columns=p.traits)], axis=1)
        df["combination"] = combination_codes(B)
        df.insert(0, "slide_id", sid)
        df.insert(0, "model_id", mid)
        write_parquet(df, store.predictions_path(mid, sid))
    summary = {"model_id": mid, "kind": "traits", "extraction_id": p.extraction_id, "traits": ",".join(p.traits),
               "n_slides": int(len(smap)), **{f"test_auc_{r['trait']}": r["test_auc"] for r in rows},
               **{f"ood_all_auc_{r['trait']}": r["ood_all_auc"] for r in rows},
               **{f"heldout_auc_{r['trait']}": r["heldout_auc"] for r in rows}}
    save_model(store, mid, kind="traits", params=pdict, summary=summary, tables={"metrics": metrics, "slides": smap},
               extraction_id=p.extraction_id, seconds=round(time.perf_counter() - t0, 3))
    return {**summary, "cached": False, "metrics": metrics.to_dict("records")}


def _frac_pos(clf, F: np.ndarray) -> float:
    return float((clf.predict(F) == 1).mean())


def hti_table(store: Store, mid: str, out: str | Path | None = None) -> pd.DataFrame:
    """HTI per slide from a traits model's tile maps, joined with clinical data when present."""
    meta = load_model(store, mid)
    if meta["kind"] != "traits":
        raise HefeatError(f"Model {mid} is a {meta['kind']} model; HTI needs a traits model")
    traits = meta["params"]["traits"]
    rows = []
    for sid in load_table(store, mid, "slides")["slide_id"]:
        df = pd.read_parquet(store.predictions_path(mid, sid))
        B = df[traits].to_numpy(bool)
        rows.append({"slide_id": sid, "hti": hti(B), "n_tiles": len(B), "positive_tiles": int(B.any(1).sum()),
                     **{f"share_{t}": float(df[t].mean()) for t in traits}})
    res = pd.DataFrame(rows)
    res = res.merge(clinical_by_slide(store), on="slide_id", how="left")
    res.insert(0, "model_id", mid)
    write_parquet(res, store.model_dir(mid) / "hti.parquet")
    if out:
        (res.to_parquet if str(out).endswith(".parquet") else res.to_csv)(out)
    return res


def survival(store: Store, mid: str, *, by: str = "hti", threshold: float = 0.5, time_col: str = "survival_months",
             event_col: str = "event", out: str | Path | None = None) -> dict:
    """Kaplan–Meier curves and log-rank test for patients above vs at/below `threshold` of `by`."""
    from lifelines.statistics import logrank_test

    res = hti_table(store, mid)
    for c in (time_col, event_col):
        if c not in res.columns:
            raise HefeatError(f"The clinical table has no {c!r} column; survival needs time and event columns "
                              f"(use --time-col / --event-col)")
    if by not in res.columns:
        raise HefeatError(f"Cannot split by {by!r}; available: hti, share_<trait>")
    pat = res.groupby("patient_id").agg(value=(by, "mean"), t=(time_col, "first"), e=(event_col, "first")).dropna()
    hi = pat["value"] > threshold
    if hi.all() or (~hi).all():
        raise HefeatError(f"Every patient is on one side of {by} = {threshold}; choose another --threshold")
    lr = logrank_test(pat.loc[hi, "t"], pat.loc[~hi, "t"], pat.loc[hi, "e"], pat.loc[~hi, "e"])
    med = {}
    if out:
        from hefeat.figures.survival import kaplan_meier

        groups = {f"{by} > {threshold}": hi, f"{by} ≤ {threshold}": ~hi}
        what = "HTI (heterogeneity of trait maps)" if by == "hti" else f"{by} (trait maps)"
        title = (f"Survival of {len(pat)} patients: {what} > {threshold} vs ≤ {threshold}\n"
                 f"traits model {mid}; patients without {time_col} or {event_col} left out")
        med = kaplan_meier({k: (pat.loc[m, "t"].to_numpy(), pat.loc[m, "e"].to_numpy()) for k, m in groups.items()},
                           title=title, time_label=time_col.replace("_", " "), p_value=float(lr.p_value),
                           out=out)["median_survival"]
    events_hi = pat.loc[hi, "e"].sum() / pat.loc[hi, "t"].sum()
    events_lo = pat.loc[~hi, "e"].sum() / pat.loc[~hi, "t"].sum()
    return {"model_id": mid, "by": by, "threshold": threshold, "n_high": int(hi.sum()), "n_low": int((~hi).sum()),
            "logrank_p": float(lr.p_value), "event_rate_high": float(events_hi), "event_rate_low": float(events_lo),
            "median_survival": med, "out": str(out) if out else None}


def cartography(store: Store, mid: str, slide_id: str, out: str | Path, *, mpp: float | None = None) -> dict:
    """Per-trait binary maps and the combined map of a slide over its H&E, with legends and HTI (PNG)."""
    from hefeat.explore.thumbnail import slide_image
    from hefeat.figures.spatial import trait_maps

    meta = load_model(store, mid)
    traits = meta["params"]["traits"]
    p = store.predictions_path(mid, slide_id)
    if not p.exists():
        raise HefeatError(f"Model {mid} has no tile map for slide {slide_id}")
    df = pd.read_parquet(p)
    tid = store.extraction(meta["extraction_id"])["tiling_id"]
    df = df.merge(store.tiles(tid, slide_id)[["tile_id", "size0"]], on="tile_id", how="left")
    row = store.slides([slide_id]).iloc[0]
    img = slide_image(store, slide_id, mpp or max(float(row["width"]), float(row["height"])) * float(row["mpp_x"]) / 1000)
    B = df[traits].to_numpy(bool)
    h = hti(B)
    title = (f"Trait maps of slide {slide_id} (traits model {mid}): tiles predicted high/low per trait; "
             f"HTI = {h:.2f}")
    note = (f"HTI (heterogeneity index, PathoMCH): normalised Shannon entropy of the {2 ** len(traits) - 1} "
            "combinations of high traits over tiles high for at least one trait; 0 = one combination, 1 = all equally "
            "common. A tile is 'high' when the ensemble's majority vote calls it above the cohort median.")
    r = trait_maps(img, df, {t: B[:, k] for k, t in enumerate(traits)}, title=title, note=note, out=out)
    return {"model_id": mid, "slide_id": slide_id, "out": str(out), "hti": h, "tiles": len(df), **r}
