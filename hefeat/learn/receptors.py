"""Slide-level receptor / subtype classifiers (Ektefaie et al., npj Breast Cancer 2021) on frozen embeddings.

Tiles: the top-N per slide by tissue density (share of pixels with R, G, B all < 200). Splits grouped
by tissue source site. A tile classifier (logistic regression); patient prediction = mean tile
probability; AUC with a 95 % bootstrap CI at tile and patient level; multi-class labels report
top-1/top-2 accuracy. Baseline: logistic regression on expression without the label's own gene.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.classifiers import tile_classifier
from hefeat.learn.data import clinical_by_slide
from hefeat.learn.models import model_exists, model_id, model_summary, save_model
from hefeat.learn.splits import assert_disjoint, site_split
from hefeat.learn.stats import auc_with_ci
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

OWN_GENES = {"er_status": ["ESR1"], "pr_status": ["PGR"], "her2_status": ["ERBB2"]}


@dataclass
class ReceptorParams:
    """Parameters of `hefeat fit receptors` (recorded with the model)."""

    extraction_id: str
    label: str = "er_status"
    split: str = "site"
    tiles: str = "top:200"
    val_share: float = 0.25
    test_share: float = 0.25
    C: float = 0.1
    dataset: str | None = "expression"
    exclude_genes: list[str] | None = None
    n_boot: int = 1000
    seed: int = 0


def _labels(store: Store, label: str) -> pd.DataFrame:
    clin = clinical_by_slide(store)
    if label not in clin.columns:
        raise HefeatError(f"Label {label!r} is not a column of the clinical table")
    df = clin[["slide_id", "patient_id", "site", label]].dropna(subset=[label]).reset_index(drop=True)
    df["site"] = df["site"].fillna("unknown")
    return df.rename(columns={label: "y"})


def _top_tiles(store: Store, eid: str, sid: str, spec: str) -> np.ndarray:
    kind, _, n = spec.partition(":")
    if kind == "all":
        return np.arange(len(store.tiles(store.extraction(eid)["tiling_id"], sid)))
    if kind != "top":
        raise HefeatError("--tiles must be top:N or all")
    t = store.tiles(store.extraction(eid)["tiling_id"], sid)
    if "density" not in t.columns or t["density"].isna().all():
        raise HefeatError("This tiling has no density QC column; the top-N rule needs it")
    return np.sort(t.sort_values(["density", "tile_id"], ascending=[False, True])["tile_id"].to_numpy()[: int(n or 200)])


def fit_receptors(store: Store, p: ReceptorParams, *, force: bool = False) -> dict:
    """Site-grouped tile classifier for a clinical label, evaluated at tile and patient level."""
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    pdict = asdict(p)
    mid = model_id("receptors", pdict)
    if model_exists(store, mid) and not force:
        return model_summary(store, mid, cached=True)
    store.extraction(p.extraction_id)
    lab = _labels(store, p.label)
    done = set(store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ?", [p.extraction_id])["slide_id"])
    lab = lab[lab["slide_id"].isin(done)].reset_index(drop=True)
    classes = sorted(lab["y"].astype(str).unique())
    if len(classes) < 2:
        raise HefeatError(f"Label {p.label!r} has one class only among slides with features")
    lab["yc"] = lab["y"].astype(str).map({c: i for i, c in enumerate(classes)})
    if p.split != "site":
        raise HefeatError("Only --split site is available for receptors (no site in two parts)")
    f = site_split(lab["site"].to_numpy(), val_share=p.val_share, test_share=p.test_share, seed=p.seed)
    assert_disjoint(lab["site"].to_numpy(), f.train, f.val, f.test)
    X, y, owner = [], [], []
    for i, r in lab.iterrows():
        rows = _top_tiles(store, p.extraction_id, r.slide_id, p.tiles)
        X.append(read_features(store.features_path(p.extraction_id, r.slide_id), rows))
        y.append(np.full(len(rows), r.yc))
        owner.append(np.full(len(rows), i))
    X, y, owner = np.concatenate(X), np.concatenate(y), np.concatenate(owner)
    trm = np.isin(owner, f.train)
    if len(np.unique(y[trm])) < len(classes):
        raise HefeatError("The training sites do not contain every class; try another --seed")
    clf = tile_classifier(C=p.C).fit(X[trm], y[trm])
    prob = clf.predict_proba(X)
    out = {"model_id": mid, "kind": "receptors", "extraction_id": p.extraction_id, "label": p.label,
           "classes": ",".join(classes), "split": f"site seed={p.seed}",
           "test_sites": ",".join(sorted(set(lab.loc[f.test, "site"]))), "n_test_patients": int(lab.loc[f.test, "patient_id"].nunique())}
    rows = []
    for part, idx in (("validation", f.val), ("test", f.test)):
        tm = np.isin(owner, idx)
        pat = pd.DataFrame(prob[tm], columns=classes).groupby(lab.loc[owner[tm], "patient_id"].to_numpy()).mean()
        truth = lab.loc[idx].groupby("patient_id")["yc"].first().loc[pat.index].to_numpy()
        if len(classes) == 2:
            tile = auc_with_ci(y[tm], prob[tm, 1], n_boot=p.n_boot, seed=p.seed, groups=owner[tm])
            patient = auc_with_ci(truth, pat.iloc[:, 1].to_numpy(), n_boot=p.n_boot, seed=p.seed)
            rows.append({"part": part, "level": "tile", **tile})
            rows.append({"part": part, "level": "patient", **patient})
        else:
            P = pat.to_numpy()
            order = np.argsort(-P, 1)
            top1 = float((order[:, 0] == truth).mean())
            top2 = float((order[:, :2] == truth[:, None]).any(1).mean())
            try:
                mauc = float(roc_auc_score(truth, P, multi_class="ovr", labels=list(range(len(classes)))))
            except ValueError:
                mauc = float("nan")
            rows.append({"part": part, "level": "patient", "top1": top1, "top2": top2, "auc": mauc, "n": len(truth)})
    metrics = pd.DataFrame(rows)
    test_pat = metrics[(metrics["part"] == "test") & (metrics["level"] == "patient")].iloc[0]
    out.update({"patient_auc": float(test_pat["auc"])})
    if len(classes) == 2:
        out.update({"patient_auc_ci_low": float(test_pat["ci_low"]), "patient_auc_ci_high": float(test_pat["ci_high"]),
                    "tile_auc": float(metrics[(metrics["part"] == "test") & (metrics["level"] == "tile")]["auc"].iloc[0])})
    else:
        out.update({"top1": float(test_pat["top1"]), "top2": float(test_pat["top2"])})
    base = _expression_baseline(store, p, lab, f, classes)
    if base is not None:
        out["expression_baseline_auc"] = base
    save_model(store, mid, kind="receptors", params=pdict, summary=out, tables={"metrics": metrics},
               extraction_id=p.extraction_id, seconds=round(time.perf_counter() - t0, 3))
    return {**out, "cached": False, "metrics": metrics.to_dict("records")}


def _expression_baseline(store: Store, p: ReceptorParams, lab: pd.DataFrame, f, classes) -> float | None:
    """Logistic regression on expression without the label's own genes, same site split; test AUC."""
    from sklearn.metrics import roc_auc_score

    if not p.dataset or len(classes) != 2:
        return None
    from hefeat.learn.data import expression_table

    try:
        wide = np.log1p(expression_table(store, p.dataset))
    except HefeatError:
        return None
    drop = set(p.exclude_genes or OWN_GENES.get(p.label, []))
    wide = wide[[g for g in wide.columns if g not in drop]]
    smap = store.sql("SELECT sample_id, slide_id FROM samples WHERE dataset = ?", [p.dataset]).drop_duplicates("slide_id")
    m = lab.merge(smap, on="slide_id", how="inner")
    m = m[m["sample_id"].isin(wide.index)]
    tr = m[m["slide_id"].isin(lab.loc[f.train, "slide_id"])]
    te = m[m["slide_id"].isin(lab.loc[f.test, "slide_id"])]
    if te["yc"].nunique() < 2 or tr["yc"].nunique() < 2:
        return None
    clf = tile_classifier(C=p.C).fit(wide.loc[tr["sample_id"]].to_numpy(), tr["yc"])
    return float(roc_auc_score(te["yc"], clf.predict_proba(wide.loc[te["sample_id"]].to_numpy())[:, 1]))
