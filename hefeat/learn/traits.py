"""PathoMCH-style binary trait maps, heterogeneity index and survival (Levy-Jurgenson et al. 2020).

Per trait, a patient is "high" when its expression is above the patients' median; patients between
two percentiles (20th-80th) never train: they are out-of-distribution (OOD-near: within 10 points of
the cut-offs; OOD-all). A subject-level test set (10 % of the patients, shared by every trait) is
drawn first, then 5 random train/validation splits of each trait's remaining extreme patients; a tile
classifier on frozen embeddings (every tile inherits its slide's label); slide score = share of tiles
called positive; the ensemble is a per-tile majority vote of the 3 best models by validation AUC.
Every decision is per patient: all slides of a patient share its label, part and eligibility.

Binary tile maps of several traits give cartographies and the heterogeneity index (hti.py). HTI and
survival use held-out patients only -- those no trait model trained or was selected on (test
patients, and patients OOD for every trait): trained slides get in-sample, near-homogeneous maps,
so their HTI would confound survival with training membership. As in PathoMCH, patients with
HTI = 0 are skipped and follow-up is capped at 10 years.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.hti import combination_codes, hti
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    param,
    register,
    require_kind,
)
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.predictions import write_predictions

PARTS = ("train", "validation", "test", "ood", "ood_near")
HELD_OUT = ("test", "ood", "ood_near")


@dataclass(frozen=True, kw_only=True)
class TraitsParams(Params):
    """Parameters of `hefeat fit traits` (recorded with the model)."""

    extraction_id: str = param(help="Extraction whose tile embeddings are classified.", flag="--extraction")
    traits: tuple[str, ...] = param(("MKI67", "miR-17"), "Gene/miRNA of the expression table; repeat.",
                                    flag="--trait", multiple=True)
    dataset: str = param("expression", "Expression dataset holding the traits.", flag="--target")
    exclude_mid: tuple[float, float] = param((20.0, 80.0), "Percentiles kept out of training (OOD), e.g. 20,80.")
    splits: int = param(5, "Random train/validation splits per trait.")
    test_share: float = param(0.1, "Share of patients held out as the test set (shared by every trait).")
    val_share: float = param(0.2, "Share of a trait's training patients used for validation in each split.")
    head: str = param("logistic", "Tile classifier: logistic regression or a small MLP.", choices=("logistic", "mlp"))
    C: float = param(0.05, "Inverse L2 penalty of the logistic tile classifier.")
    max_iter: int = param(2000, "Solver iterations of the tile classifier.")
    mlp_hidden: int = param(64, "Hidden units of the MLP tile classifier (--head mlp).")
    ensemble: int = param(3, "Models (best validation AUC) in the per-tile majority vote.")
    crossfit: int = param(5, "Patient folds of the cross-fitted maps HTI survival uses (each patient's maps from "
                             "models that never saw it); 0 = maps from the one model (held-out rule only).")
    max_tiles_per_slide: int = param(500, "Training tiles drawn per slide (maps use every tile).")
    seed: int = param(0, "Seed of the test set, the splits, the tile draws and the classifiers.")

    def validate(self) -> None:
        if not self.traits:
            raise HefeatError("Name at least one --trait")
        if len(set(self.traits)) != len(self.traits):
            raise HefeatError(f"--trait names repeat: {', '.join(self.traits)}")
        lo, hi = self.exclude_mid
        if not 0 <= lo < 50 < hi <= 100:
            raise HefeatError("--exclude-mid must be two percentiles around the median, e.g. 20,80")
        check_range("--splits", self.splits, 1)
        check_range("--test-share", self.test_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--C", self.C, 0, lo_open=True)
        check_range("--max-iter", self.max_iter, 1)
        check_range("--ensemble", self.ensemble, 1, self.splits)
        check_range("--max-tiles-per-slide", self.max_tiles_per_slide, 1)
        if self.crossfit:
            check_range("--crossfit", self.crossfit, 2)

    def classifier(self, seed: int):
        """The tile classifier with these hyperparameters."""
        from hefeat.learn.classifiers import tile_classifier

        return tile_classifier(self.head, C=self.C, max_iter=self.max_iter, hidden=self.mlp_hidden, seed=seed)


# ----------------------------------------------------------------------------------------------
# Patient-level labels and parts
# ----------------------------------------------------------------------------------------------
def patient_parts(values: pd.Series, test_patients: set[str], exclude_mid: tuple[float, float]) -> pd.DataFrame:
    """Per patient: label (above the patients' median), percentile, and part (test / ood / ood_near / pool).

    `values` is one trait value per patient (index = patient_id). OOD is decided on the patient's
    value, so every slide of a patient is on the same side.
    """
    lo, hi = exclude_mid
    pct = values.rank(pct=True) * 100
    label = (values > values.median()).astype(int)
    ood_all = (pct > lo) & (pct <= hi)
    ood_near = ((pct > lo) & (pct <= lo + 10)) | ((pct > hi - 10) & (pct <= hi))
    part = np.where(values.index.isin(list(test_patients)), "test",
                    np.where(ood_all, np.where(ood_near, "ood_near", "ood"), "pool"))
    return pd.DataFrame({"value": values, "percentile": pct, "label": label, "part": part}, index=values.index)


def patient_trait_values(store: Store, dataset: str, traits, slide_ids, *,
                         wide: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slides: slide_id, patient_id of those slides with expression; one log1p value per patient and trait).

    A patient's value is the mean over its samples' rows; every method labelling traits (fit traits,
    fine-tuned trait jobs) reads it here, so they agree on who is high, OOD and held out.
    """
    from hefeat.learn.data import expression_table, transform_values

    wide = expression_table(store, dataset) if wide is None else wide
    smap = store.sql("SELECT s.sample_id, s.slide_id, sl.patient_id FROM samples s JOIN slides sl USING (slide_id) "
                     "WHERE s.dataset = ? ORDER BY s.slide_id, s.sample_id", [dataset])
    smap = smap[smap["slide_id"].isin(set(slide_ids)) & smap["sample_id"].isin(wide.index)].reset_index(drop=True)
    slides = smap.drop_duplicates("slide_id")[["slide_id", "patient_id"]].reset_index(drop=True)
    vals = pd.DataFrame(transform_values(wide.loc[smap["sample_id"], list(traits)].to_numpy(float), "log1p"),
                        columns=list(traits))
    vals["patient_id"] = smap["patient_id"].to_numpy()
    return slides, vals.groupby("patient_id").mean()


def _ensemble(p: TraitsParams, ti: int, feats: dict, draw: dict, sids: list[str], patients: np.ndarray,
              label: np.ndarray, pool: np.ndarray, seed: int) -> list:
    """PathoMCH's model selection on the `pool` slides: p.splits random train/validation splits by patient,
    one tile classifier each; returns (val AUC, split, classifier, validation rows), best first."""
    from hefeat.learn.splits import assert_disjoint, group_holdout

    pool_pat = np.array(sorted(set(patients[pool])))
    models = []
    if len(pool_pat) < 2:
        return models
    for s in range(p.splits):
        f = group_holdout(pool_pat, p.val_share, seed=seed + 1 + s)
        val_pat = set(pool_pat[f.test])
        tr = np.flatnonzero(pool & ~np.isin(patients, list(val_pat)))
        va = np.flatnonzero(np.isin(patients, list(val_pat)))
        assert_disjoint(patients, tr, va, np.flatnonzero(~pool))
        if len(np.unique(label[tr])) < 2:
            continue
        Xtr = np.concatenate([feats[sids[i]][draw[sids[i]]] for i in tr])
        ytr = np.concatenate([np.full(len(draw[sids[i]]), label[i]) for i in tr])
        clf = p.classifier(seed + 100 * ti + s).fit(Xtr, ytr)
        val_auc = _slide_auc(label[va], np.array([_frac_pos(clf, feats[sids[i]]) for i in va]))
        models.append((val_auc if np.isfinite(val_auc) else 0.0, s, clf, va))
    models.sort(key=lambda m: (-m[0], m[1]))
    return models


def _slide_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def _frac_pos(clf, F: np.ndarray) -> float:
    return float((clf.predict(F) == 1).mean())


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------
def fit_traits(store: Store, p: TraitsParams, model_id: str) -> FitResult:
    """Fit trait tile classifiers; binary tile maps (ensemble) for every slide; held-out AUCs per trait."""
    from hefeat.learn.aggregate import majority_vote
    from hefeat.learn.data import expression_table, finished_slides, slide_tiles
    from hefeat.learn.splits import group_holdout, group_kfold

    wide = expression_table(store, p.dataset)
    missing = [t for t in p.traits if t not in wide.columns]
    if missing:
        raise HefeatError(f"Traits not in the expression table {p.dataset!r}: {', '.join(missing)}")
    slides, per_patient = patient_trait_values(store, p.dataset, p.traits, finished_slides(store, p.extraction_id),
                                               wide=wide)
    if len(slides) < 10:
        raise NotEstimable(f"Trait models need at least 10 slides with features and expression, found {len(slides)}")
    patients = slides["patient_id"].to_numpy().astype(str)
    all_pat = np.unique(patients)
    test_pat = set(all_pat[group_holdout(all_pat, p.test_share, seed=p.seed).test])
    rng = np.random.default_rng(p.seed)
    feats, coords, draw = {}, {}, {}
    for st in slide_tiles(store, p.extraction_id, list(slides["slide_id"]), columns=("row", "col")):
        feats[st.slide_id], coords[st.slide_id] = st.X, st.tiles
        draw[st.slide_id] = np.sort(rng.choice(len(st.X), min(len(st.X), p.max_tiles_per_slide), replace=False))
    sids = slides["slide_id"].tolist()
    rows, maps, notes = [], {sid: {} for sid in sids}, []
    cf_folds = group_kfold(patients, min(p.crossfit, len(all_pat)), seed=p.seed) if p.crossfit else []
    cf_maps: dict = {sid: {} for sid in sids}
    cf_missing: set[int] = set()
    for ti, trait in enumerate(p.traits):
        pp = patient_parts(per_patient[trait], test_pat, p.exclude_mid)
        label = pp.loc[patients, "label"].to_numpy()
        base_part = pp.loc[patients, "part"].to_numpy()
        pool_pat = np.array(sorted(pp.index[pp["part"] == "pool"]))
        part = base_part.copy()
        models = _ensemble(p, ti, feats, draw, sids, patients, label, base_part == "pool", p.seed)
        if not models:
            raise NotEstimable(f"Trait {trait}: no split had both classes among its training patients "
                               f"({len(pool_pat)} patients outside the {p.exclude_mid[0]:g}-{p.exclude_mid[1]:g} band); "
                               "narrow --exclude-mid or add slides")
        best = models[: p.ensemble]
        # Patients any chosen model validated on were used for selection: they count as training here.
        chosen_val = np.unique(np.concatenate([m[3] for m in best]))
        part[base_part == "pool"] = "train"
        part[chosen_val] = "validation"
        votes = {sid: majority_vote(np.stack([m[2].predict(feats[sid]) for m in best])) for sid in sids}
        score = np.array([votes[sid].mean() for sid in sids])
        single = np.array([_frac_pos(best[0][2], feats[sid]) for sid in sids])
        sets = {"test": part == "test", "ood_near": part == "ood_near", "ood_all": np.isin(part, ("ood", "ood_near")),
                "heldout": np.isin(part, HELD_OUT)}
        aucs = {k: _slide_auc(label[m], score[m]) for k, m in sets.items()}
        rows.append({"trait": trait, **{f"{k}_auc": v for k, v in aucs.items()},
                     "test_auc_best_single": _slide_auc(label[sets["test"]], single[sets["test"]]),
                     "val_auc_best": best[0][0], **{f"n_{k}": int(m.sum()) for k, m in sets.items()},
                     "n_train": int((part == "train").sum()), "n_validation": int((part == "validation").sum()),
                     "models": len(models),
                     "split": f"subject test {p.test_share:g} + {p.splits} train/val seed={p.seed}"})
        for k in ("test", "heldout"):
            if not np.isfinite(aucs[k]):
                m = sets[k]
                have = sorted(set(label[m].tolist()))
                notes.append(f"{trait}: {k} AUC not estimable: {int(m.sum())} slides "
                             f"({'no class' if not have else 'only class ' + ','.join(map(str, have))}); "
                             + ("use a larger --test-share or narrower --exclude-mid" if k == "test"
                                else "add slides"))
        for sid in sids:
            maps[sid][trait] = votes[sid]
        if p.crossfit:  # every patient's map from ensembles trained without it (the same procedure)
            extreme = patient_parts(per_patient[trait], set(), p.exclude_mid).loc[patients, "part"].to_numpy() == "pool"
            for k, f in enumerate(cf_folds):
                fold_models = _ensemble(p, ti, feats, draw, sids, patients, label,
                                        extreme & ~np.isin(np.arange(len(sids)), f.test), p.seed + 1000 * (k + 1))
                if not fold_models:
                    cf_missing.add(k)
                    continue
                for i in f.test:
                    cf_maps[sids[i]][trait] = majority_vote(np.stack([m[2].predict(feats[sids[i]])
                                                                      for m in fold_models[: p.ensemble]]))
        slides[f"label_{trait}"] = label
        slides[f"part_{trait}"] = part
        slides[f"score_{trait}"] = score
    metrics = pd.DataFrame(rows)
    auc_cols = [c for c in metrics.columns if c.endswith("_auc") or c == "test_auc_best_single"]
    if not np.isfinite(metrics[auc_cols].to_numpy(float)).any():
        raise NotEstimable(f"No AUC could be estimated for any trait on {len(slides)} slides: every held-out set holds "
                           "one class; use a larger --test-share, narrower --exclude-mid, or more slides")
    part_cols = [f"part_{t}" for t in p.traits]
    slides["heldout"] = slides[part_cols].isin(HELD_OUT).all(axis=1)
    n_pat_heldout = int(slides.loc[slides["heldout"], "patient_id"].nunique())
    if n_pat_heldout < 10:
        notes.append(f"only {n_pat_heldout} patients are held out for every trait (test or OOD): HTI survival on "
                     "them has little power; use more slides or a larger --test-share")
    # The maps written (and used by HTI): cross-fitted where every trait's fold ensemble exists.
    slides["map_heldout"] = slides["heldout"]
    slides["map_from"] = "model"
    for k, f in enumerate(cf_folds):
        if k in cf_missing:
            notes.append(f"cross-fit fold {f.name}: a trait had one class among its training patients; its "
                         f"{len(np.unique(patients[f.test]))} patients keep the main model's maps (held-out rule)")
            continue
        for i in f.test:
            maps[sids[i]] = cf_maps[sids[i]]
        slides.loc[f.test, "map_heldout"] = True
        slides.loc[f.test, "map_from"] = f"crossfit {f.name}"
    with write_predictions(store, model_id) as write_pred:
        for sid in sids:
            t = coords[sid].reset_index(drop=True)
            B = np.stack([maps[sid][x] for x in p.traits], 1)
            df = pd.concat([t[["tile_id", "x", "y", "row", "col"]], pd.DataFrame(B, columns=list(p.traits))], axis=1)
            df["combination"] = combination_codes(B)
            df.insert(0, "slide_id", sid)
            df.insert(0, "model_id", model_id)
            write_pred(sid, df)
    summary = {"extraction_id": p.extraction_id, "traits": ",".join(p.traits), "n_slides": int(len(slides)),
               "n_patients": int(len(all_pat)), "n_test_patients": len(test_pat),
               "n_heldout_patients": n_pat_heldout,
               "maps": (f"cross-fitted over {len(cf_folds)} patient folds" if p.crossfit else "one model"),
               "n_map_heldout_patients": int(slides.loc[slides["map_heldout"], "patient_id"].nunique()),
               **{f"test_auc_{r['trait']}": r["test_auc"] for r in rows},
               **{f"ood_all_auc_{r['trait']}": r["ood_all_auc"] for r in rows},
               **{f"heldout_auc_{r['trait']}": r["heldout_auc"] for r in rows},
               **{f"n_heldout_{r['trait']}": r["n_heldout"] for r in rows}}
    return FitResult(summary=summary, tables={"metrics": metrics, "slides": slides}, extraction_id=p.extraction_id,
                     notes=notes)


# ----------------------------------------------------------------------------------------------
# HTI and survival (held-out patients only)
# ----------------------------------------------------------------------------------------------
def hti_table(store: Store, mid: str, out: str | Path | None = None) -> pd.DataFrame:
    """HTI per slide from a traits model's tile maps, with its parts, `heldout` flag and clinical data.

    `heldout` is True for slides of patients no trait model trained or was selected on; only those
    may enter a survival analysis.
    """
    from hefeat.learn.data import clinical_by_slide
    from hefeat.learn.models import load_model, load_table
    from hefeat.store.tables import write_parquet

    meta = load_model(store, mid)
    require_kind(meta, "traits", "HTI")
    traits = meta["params"]["traits"]
    sl = load_table(store, mid, "slides")
    if "heldout" not in sl.columns:
        raise HefeatError(f"Traits model {mid} was fitted before hefeat tracked which patients are held out, so its "
                          "HTI cannot be restricted to them; refit it (hefeat fit traits ... --force)")
    rows = []
    for sid in sl["slide_id"]:
        df = pd.read_parquet(store.predictions_path(mid, sid))
        B = df[traits].to_numpy(bool)
        rows.append({"slide_id": sid, "hti": hti(B), "n_tiles": len(B), "positive_tiles": int(B.any(1).sum()),
                     **{f"share_{t}": float(df[t].mean()) for t in traits}})
    if "map_heldout" not in sl.columns:  # fitted before cross-fitting: maps from the one model
        sl = sl.assign(map_heldout=sl["heldout"], map_from="model")
    res = pd.DataFrame(rows).merge(sl[["slide_id", "heldout", "map_heldout", "map_from",
                                       *[f"part_{t}" for t in traits]]], on="slide_id")
    clin = clinical_by_slide(store)
    res = res.merge(clin, on="slide_id", how="left")
    res.insert(0, "model_id", mid)
    write_parquet(res, layout.model_table_path(store.root, mid, "hti"))
    if out:
        if str(out).endswith(".parquet"):
            res.to_parquet(out, index=False)
        else:
            res.to_csv(out, index=False)
    return res


def hti_summary(res: pd.DataFrame) -> dict:
    """Counts and mean HTI of an hti_table, held-out slides (the only ones survival may use) apart from trained-on ones."""
    held = res[res["heldout"]]
    trained = res[~res["heldout"]]
    return {"n_slides": len(res), "n_heldout_slides": len(held),
            "hti": res[["slide_id", "hti", "heldout"]].to_dict("records"),
            "mean_hti_heldout": float(held["hti"].mean()) if len(held) else None,
            "mean_hti_trained": float(trained["hti"].mean()) if len(trained) else None}


def _follow_up_cap(time_col: str, max_follow_up: float | None) -> float:
    """10 years in the time column's unit (months, days, years by its name), or the cap given."""
    if max_follow_up is not None:
        return float(max_follow_up)
    name = time_col.lower()
    for unit, ten_years in (("month", 120.0), ("day", 3652.5), ("year", 10.0), ("week", 521.8)):
        if unit in name:
            return ten_years
    raise HefeatError(f"Cannot tell the time unit of {time_col!r} (months, days, weeks or years in its name); "
                      "pass --max-follow-up in that unit (10 years)")


SURVIVAL_RULES = ("auto", "crossfit", "heldout")


def survival(store: Store, mid: str, *, by: str = "hti", threshold: float = 0.5, time_col: str = "survival_months",
             event_col: str = "event", max_follow_up: float | None = None, out: str | Path | None = None,
             rule: str = "auto") -> dict:
    """Kaplan–Meier curves and log-rank test, `by` above vs at/below `threshold`, on patients whose maps are honest.

    rule 'crossfit': every patient whose maps came from cross-fitted models that never saw it (all of
    them when the model was fitted with --crossfit); 'heldout': PathoMCH's rule, only patients no
    trait model trained or was selected on; 'auto': crossfit when the model has cross-fitted maps.
    Patients with HTI = 0 skipped; follow-up capped at 10 years (events after the cap censored at it).
    """
    from lifelines.statistics import logrank_test

    res = hti_table(store, mid)
    for c in (time_col, event_col):
        if c not in res.columns:
            raise HefeatError(f"The clinical table has no {c!r} column; survival needs time and event columns "
                              f"(use --time-col / --event-col)")
    if by not in res.columns:
        raise HefeatError(f"Cannot split by {by!r}; available: hti, share_<trait>")
    if rule not in SURVIVAL_RULES:
        raise HefeatError(f"--rule must be one of {', '.join(SURVIVAL_RULES)}, got {rule!r}")
    crossfitted = res["map_from"].astype(str).str.startswith("crossfit")
    if rule == "auto":
        rule = "crossfit" if crossfitted.any() else "heldout"
    if rule == "crossfit" and not crossfitted.any():
        raise HefeatError(f"Traits model {mid} has no cross-fitted maps; refit with --crossfit 5 or use --rule heldout")
    flag = "map_heldout" if rule == "crossfit" else "heldout"
    cap = _follow_up_cap(time_col, max_follow_up)
    pat = res.groupby("patient_id").agg(value=(by, "mean"), t=(time_col, "first"), e=(event_col, "first"),
                                        heldout=(flag, "all"), hti=("hti", "mean"))
    n_all = len(pat)
    pat = pat.dropna(subset=["value", "t", "e"])
    n_missing = n_all - len(pat)
    n_trained = int((~pat["heldout"]).sum())
    pat = pat[pat["heldout"]]
    n_zero = int((pat["hti"] == 0).sum())
    pat = pat[pat["hti"] > 0]
    capped = pat["t"] > cap
    pat.loc[capped, "e"] = 0
    pat.loc[capped, "t"] = cap
    hi = pat["value"] > threshold
    counts = (f"{n_all} patients: {n_trained} trained on (excluded), {n_zero} held-out with HTI = 0 (skipped), "
              f"{n_missing} without survival data")
    if hi.all() or (~hi).all():
        raise NotEstimable(f"All {len(pat)} usable patients ({rule} rule) are on one side of {by} = {threshold} "
                           f"({counts}); choose another --threshold or fit traits on more slides")
    lr = logrank_test(pat.loc[hi, "t"], pat.loc[~hi, "t"], pat.loc[hi, "e"], pat.loc[~hi, "e"])
    med = {}
    if out:
        med = _km_plot(pat, hi, by, threshold, time_col, float(lr.p_value), cap, mid, out, rule)
    events_hi = pat.loc[hi, "e"].sum() / pat.loc[hi, "t"].sum()
    events_lo = pat.loc[~hi, "e"].sum() / pat.loc[~hi, "t"].sum()
    notes = []
    if min(hi.sum(), (~hi).sum()) < 5:
        notes.append(f"{int(hi.sum())} vs {int((~hi).sum())} patients: a log-rank test on groups this small has "
                     "little power and an unstable p-value; use more slides")
    return {"model_id": mid, "by": by, "threshold": threshold, "n_high": int(hi.sum()), "n_low": int((~hi).sum()),
            "n_patients": n_all, "n_excluded_trained": n_trained, "n_skipped_hti_zero": n_zero,
            "n_missing_survival": n_missing, "n_censored_at_cap": int(capped.sum()), "max_follow_up": cap,
            "rule": rule,
            "patients": ("all patients, maps cross-fitted over patient folds (each from models that never saw it)"
                         if rule == "crossfit" else "held-out only (test + OOD for every trait; PathoMCH's rule)"),
            "logrank_p": float(lr.p_value), "event_rate_high": float(events_hi), "event_rate_low": float(events_lo),
            "median_survival": med, "notes": notes, "out": str(out) if out else None}


def _km_plot(pat: pd.DataFrame, hi: pd.Series, by: str, threshold: float, time_col: str, p: float, cap: float,
             mid: str, out, rule: str = "heldout") -> dict:
    from hefeat.figures.survival import kaplan_meier

    groups = {f"{by} > {threshold}": hi, f"{by} ≤ {threshold}": ~hi}
    what = "HTI (heterogeneity of trait maps)" if by == "hti" else f"{by} (trait maps)"
    who = ("patients (cross-fitted maps)", "HTI = 0 excluded") if rule == "crossfit" else \
        ("held-out patients", "trained-on patients and HTI = 0 excluded")
    title = (f"Survival of {len(pat)} {who[0]}: {what} > {threshold} vs ≤ {threshold}\n"
             f"traits model {mid}; {who[1]}; follow-up capped at {cap:g} {time_col.replace('_', ' ')}")
    return kaplan_meier({k: (pat.loc[m, "t"].to_numpy(), pat.loc[m, "e"].to_numpy()) for k, m in groups.items()},
                        title=title, time_label=time_col.replace("_", " "), p_value=p, out=out)["median_survival"]


def cartography(store: Store, mid: str, slide_id: str, out: str | Path, *, mpp: float | None = None) -> dict:
    """Per-trait binary maps and the combined map of a slide over its H&E, with legends and HTI (PNG)."""
    from hefeat.figures.spatial import trait_maps
    from hefeat.learn.models import load_model
    from hefeat.slides.thumbnail import slide_image

    meta = load_model(store, mid)
    require_kind(meta, "traits", "cartography")
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



def headline(s: dict) -> str:
    """Slide AUC per trait on held-out slides (test + OOD) and how many patients HTI/survival may use."""
    def auc(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    traits = s["traits"].split(",")
    per = ", ".join(f"{t} {auc(s.get(f'heldout_auc_{t}'))} (n = {s.get(f'n_heldout_{t}', '?')})" for t in traits)
    return (f"slide AUC on held-out slides (test + OOD): {per}; {s.get('n_heldout_patients', '?')} of "
            f"{s.get('n_patients', '?')} patients held out for every trait (the ones HTI survival uses)")


def trait_plots(store: Store, mid: str, out: Path) -> list[Path]:
    """Cartography of a held-out slide, held-out ROC per trait, HTI survival when the clinical data allow."""
    from hefeat.figures.metrics import roc_curves
    from hefeat.learn.models import load_model, load_table

    meta = load_model(store, mid)
    traits = meta["params"]["traits"]
    sl = load_table(store, mid, "slides")
    files = []
    held = sl[sl["heldout"]]
    sid = (held if len(held) else sl)["slide_id"].iloc[0]
    files.append(out / layout.cartography_figure(sid))
    cartography(store, mid, sid, files[-1])
    curves = []
    for t in traits:
        h = sl[sl[f"part_{t}"].isin(HELD_OUT)]
        curves.append({"label": f"{t} (test + OOD slides)", "y_true": h[f"label_{t}"].to_numpy(),
                       "score": h[f"score_{t}"].to_numpy()})
    files.append(out / layout.FIG_ROC)
    roc_curves(curves, out=files[-1], seed=meta["params"].get("seed", 0),
               title=f"Trait high vs low per slide (share of tiles called positive) on held-out slides, model {mid}")
    try:
        survival(store, mid, out=out / layout.FIG_HTI_SURVIVAL)
        files.append(out / layout.FIG_HTI_SURVIVAL)
    except HefeatError:
        pass  # no survival columns, or every held-out patient on one side: the headline says what exists
    return files


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    return trait_plots(store, mid, out)


register(Method(
    name="traits", prefix="trt-", params=TraitsParams, fit=fit_traits, headline=headline, plots=_plots,
    units=lambda params, col: "traits predicted high (bit code)" if col == "combination" else "1 = predicted high, 0 = low",
    summary="PathoMCH trait tile classifiers; binary trait maps for every slide; HTI on held-out patients.",
    example="hefeat fit traits --extraction e1234 --trait MKI67 --trait miR-17 --exclude-mid 20,80",
))
