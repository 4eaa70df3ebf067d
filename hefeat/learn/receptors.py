"""Slide-level receptor / subtype classifiers (Ektefaie et al., npj Breast Cancer 2021) on frozen embeddings.

Tiles: the top-N per slide by tissue density (share of pixels with R, G, B all < 200). Splits grouped
by tissue source site. A tile classifier (logistic regression); patient prediction = mean tile
probability; AUC with a 95 % bootstrap CI at tile and patient level; multi-class labels report
top-1/top-2 accuracy. Baseline: logistic regression on expression without the label's own gene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    param,
    register,
)
from hefeat.store.catalog import Store

OWN_GENES = {"er_status": ["ESR1"], "pr_status": ["PGR"], "her2_status": ["ERBB2"]}
SMALL_TEST = 10  # test patients below which the bootstrap CI is flagged as unreliable


def tile_spec(v: str) -> str:
    """Validate --tiles: top:N or all."""
    kind, _, n = v.partition(":")
    if v != "all" and not (kind == "top" and n.isdigit() and int(n) > 0):
        raise HefeatError(f"--tiles must be top:N (N > 0) or all, got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class ReceptorParams(Params):
    """Parameters of `hefeat fit receptors` (recorded with the model)."""

    extraction_id: str = param(help="Extraction whose tile embeddings are classified.", flag="--extraction")
    label: str = param("er_status", "Clinical column: er_status, pr_status, her2_status, pam50, ...")
    split: str = param("site", "Grouping of the train/validation/test split (the paper: tissue source site).",
                       choices=("site",))
    tiles: str = param("top:200", "top:N densest tiles per slide, or all.", parse=tile_spec)
    val_share: float = param(0.25, "Share of sites for validation.")
    test_share: float = param(0.25, "Share of sites for test.")
    head: str = param("logistic", "Tile classifier: logistic regression or a small MLP.", choices=("logistic", "mlp"))
    C: float = param(0.1, "Inverse L2 penalty of the logistic tile classifier.")
    max_iter: int = param(3000, "Solver iterations of the tile classifier.")
    mlp_hidden: int = param(64, "Hidden units of the MLP tile classifier (--head mlp).")
    dataset: str | None = param("expression", "Expression dataset of the expression-only baseline (none: skip).")
    exclude_genes: tuple[str, ...] | None = param(None, "Genes left out of the baseline (default: the label's own gene).")
    n_boot: int = param(1000, "Bootstrap resamples of the AUC confidence interval.")
    ci_level: float = param(0.95, "Confidence level of the bootstrap interval.")
    seed: int = param(0, "Seed of the site split, the classifier and the bootstrap.")

    def validate(self) -> None:
        tile_spec(self.tiles)
        check_range("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--test-share", self.test_share, 0, 1, lo_open=True, hi_open=True)
        if self.val_share + self.test_share >= 1:
            raise HefeatError("--val-share + --test-share must leave sites for training (sum < 1)")
        check_range("--C", self.C, 0, lo_open=True)
        check_range("--max-iter", self.max_iter, 1)
        check_range("--n-boot", self.n_boot, 10)
        check_range("--ci-level", self.ci_level, 0, 1, lo_open=True, hi_open=True)

    def classifier(self):
        """The tile classifier with these hyperparameters."""
        from hefeat.learn.classifiers import tile_classifier

        return tile_classifier(self.head, C=self.C, max_iter=self.max_iter, hidden=self.mlp_hidden, seed=self.seed)


def _labels(store: Store, label: str) -> pd.DataFrame:
    from hefeat.learn.data import clinical_by_slide

    clin = clinical_by_slide(store)
    if label not in clin.columns:
        raise HefeatError(f"Label {label!r} is not a column of the clinical table")
    df = clin[["slide_id", "patient_id", "site", label]].dropna(subset=[label]).reset_index(drop=True)
    df["site"] = df["site"].fillna("unknown")
    return df.rename(columns={label: "y"})


def _top_rows(tiles: pd.DataFrame, spec: str) -> np.ndarray:
    kind, _, n = spec.partition(":")
    if kind == "all":
        return np.arange(len(tiles))
    if tiles["density"].isna().all():
        raise HefeatError("This tiling has no density QC values; --tiles top:N needs them (use --tiles all)")
    order = tiles.sort_values(["density", "tile_id"], ascending=[False, True]).index.to_numpy()
    return np.sort(order[: int(n)])


def fit_receptors(store: Store, p: ReceptorParams, model_id: str) -> FitResult:
    """Site-grouped tile classifier for a clinical label, evaluated at tile and patient level."""
    from sklearn.metrics import roc_auc_score

    from hefeat.learn.data import finished_slides, slide_tiles
    from hefeat.learn.splits import assert_disjoint, site_split
    from hefeat.learn.stats import auc_with_ci

    lab = _labels(store, p.label)
    lab = lab[lab["slide_id"].isin(set(finished_slides(store, p.extraction_id)))].reset_index(drop=True)
    classes = sorted(lab["y"].astype(str).unique())
    if len(classes) < 2:
        raise NotEstimable(f"Label {p.label!r} has one class only among slides with features")
    lab["yc"] = lab["y"].astype(str).map({c: i for i, c in enumerate(classes)})
    f = site_split(lab["site"].to_numpy(), val_share=p.val_share, test_share=p.test_share, seed=p.seed)
    assert_disjoint(lab["site"].to_numpy(), f.train, f.val, f.test)
    pos = {s: i for i, s in enumerate(lab["slide_id"])}
    X, y, owner = [], [], []
    cols = ("density",) if p.tiles != "all" else ()
    for st in slide_tiles(store, p.extraction_id, list(lab["slide_id"]), columns=cols):
        rows = _top_rows(st.tiles, p.tiles)
        i = pos[st.slide_id]
        X.append(st.X[rows])
        y.append(np.full(len(rows), lab.at[i, "yc"]))
        owner.append(np.full(len(rows), i))
    X, y, owner = np.concatenate(X), np.concatenate(y), np.concatenate(owner)
    trm = np.isin(owner, f.train)
    if len(np.unique(y[trm])) < len(classes):
        raise NotEstimable(f"The training sites do not contain every class of {p.label}; try another --seed "
                           "(the site split is random) or a smaller --test-share")
    clf = p.classifier().fit(X[trm], y[trm])
    prob = clf.predict_proba(X)
    test_sites = ",".join(sorted(set(lab.loc[f.test, "site"])))
    out = {"extraction_id": p.extraction_id, "label": p.label, "classes": ",".join(classes),
           "split": f"site seed={p.seed}", "test_sites": test_sites,
           "n_test_patients": int(lab.loc[f.test, "patient_id"].nunique()), "ci_level": p.ci_level}
    rows, scores, notes = [], [], []
    for part, idx in (("validation", f.val), ("test", f.test)):
        tm = np.isin(owner, idx)
        pat = pd.DataFrame(prob[tm], columns=classes).groupby(lab.loc[owner[tm], "patient_id"].to_numpy()).mean()
        truth = lab.loc[idx].groupby("patient_id")["yc"].first().loc[pat.index].to_numpy()
        counts = np.bincount(truth, minlength=len(classes))
        scores.append(pd.DataFrame({"part": part, "patient_id": pat.index, "y": truth,
                                    **{f"p_{c}": pat[c].to_numpy() for c in classes}}))
        if len(classes) == 2:
            tile = auc_with_ci(y[tm], prob[tm, 1], n_boot=p.n_boot, seed=p.seed, groups=owner[tm], level=p.ci_level)
            patient = auc_with_ci(truth, pat.iloc[:, 1].to_numpy(), n_boot=p.n_boot, seed=p.seed, level=p.ci_level)
            rows.append({"part": part, "level": "tile", **tile})
            rows.append({"part": part, "level": "patient", **patient, "n_class0": int(counts[0]),
                         "n_class1": int(counts[1])})
            notes += _auc_notes(part, patient, counts, classes, p)
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
            if len(truth) < SMALL_TEST:
                notes.append(f"{part}: {len(truth)} patients; top-1/top-2 accuracy on so few patients is coarse "
                             "(use a larger --test-share or more sites)")
    metrics = pd.DataFrame(rows)
    test_pat = metrics[(metrics["part"] == "test") & (metrics["level"] == "patient")].iloc[0]
    if len(classes) == 2:
        if not np.isfinite(test_pat["auc"]):
            present = ", ".join(classes[c] for c in np.flatnonzero(np.bincount(
                lab.loc[f.test, "yc"], minlength=len(classes))))
            raise NotEstimable(f"Test site(s) {test_sites} hold only class {present} of {p.label} "
                               f"({out['n_test_patients']} patients): no AUC is defined; use another --seed or a "
                               "larger --test-share so the test sites hold both classes")
        out.update({"patient_auc": float(test_pat["auc"]), "patient_auc_ci_low": float(test_pat["ci_low"]),
                    "patient_auc_ci_high": float(test_pat["ci_high"]),
                    "tile_auc": float(metrics[(metrics["part"] == "test") & (metrics["level"] == "tile")]["auc"].iloc[0])})
    else:
        out.update({"patient_auc": float(test_pat["auc"]), "top1": float(test_pat["top1"]),
                    "top2": float(test_pat["top2"])})
    base = _expression_baseline(store, p, lab, f, classes)
    if base is not None:
        out["expression_baseline_auc"] = base
    return FitResult(summary=out, tables={"metrics": metrics, "patient_scores": pd.concat(scores, ignore_index=True)},
                     extraction_id=p.extraction_id, notes=notes)


def _auc_notes(part: str, r: dict, counts: np.ndarray, classes: list[str], p: ReceptorParams) -> list[str]:
    """One line per way a binary AUC on these patients says less than it seems."""
    notes = []
    if not np.isfinite(r["auc"]):
        notes.append(f"{part}: one class only ({', '.join(classes[c] for c in np.flatnonzero(counts))}), no AUC; "
                     "use another --seed or a larger share of sites")
        return notes
    lvl = f"{p.ci_level:.0%}"
    if r["ci_low"] == r["ci_high"]:
        notes.append(f"{part}: the {lvl} bootstrap CI [{r['ci_low']:.3f}, {r['ci_high']:.3f}] is degenerate: "
                     f"{int(counts.sum())} patients ({counts[0]} vs {counts[1]}) cannot show the uncertainty; "
                     "add test sites or patients")
    elif counts.sum() < SMALL_TEST or counts.min() < 3:
        notes.append(f"{part}: AUC from {int(counts.sum())} patients ({counts[0]} vs {counts[1]}): the bootstrap CI of "
                     "so few patients is unreliable; add sites or patients")
    return notes


def _expression_baseline(store: Store, p: ReceptorParams, lab: pd.DataFrame, f, classes) -> float | None:
    """Logistic regression on expression without the label's own genes, same site split; test AUC."""
    from sklearn.metrics import roc_auc_score

    from hefeat.learn.data import expression_table

    if not p.dataset or len(classes) != 2:
        return None
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
    clf = p.classifier().fit(wide.loc[tr["sample_id"]].to_numpy(), tr["yc"])
    return float(roc_auc_score(te["yc"], clf.predict_proba(wide.loc[te["sample_id"]].to_numpy())[:, 1]))


def headline(s: dict) -> str:
    """Patient AUC with its CI on the test sites (binary), or top-1/top-2 (multi-class)."""
    if "patient_auc_ci_low" in s:
        lvl = f"{s.get('ci_level', 0.95):.0%}"
        return (f"{s['label']}: patient AUC {s['patient_auc']:.3f} ({lvl} CI {s['patient_auc_ci_low']:.3f}-"
                f"{s['patient_auc_ci_high']:.3f}) on test sites {s['test_sites']} ({s['n_test_patients']} patients)")
    return (f"{s['label']}: top-1 {s['top1']:.3f}, top-2 {s['top2']:.3f} on test sites {s['test_sites']} "
            f"({s['n_test_patients']} patients)")


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    from hefeat.learn.report import roc_plot

    return roc_plot(store, mid, out)


register(Method(
    name="receptors", prefix="rec-", params=ReceptorParams, fit=fit_receptors, headline=headline, plots=_plots,
    summary="Site-grouped slide classifiers (Ektefaie et al.): patient AUC with a 95 % bootstrap CI.",
    example="hefeat fit receptors --extraction e1234 --label er_status --split site --tiles top:200",
))
