"""ST-Net-style spot expression heads (He et al., Nature Biomedical Engineering 2020) on frozen embeddings.

Targets: counts + 1, divided by the spot total, log; the top-N genes by mean. Heads: ridge with a
per-gene penalty (or a small MLP), bias = mean expression. Leave-one-patient-out; per gene and
patient Pearson r and RMSE; a gene "works" when r > 0 in enough patients (one-sided binomial sign
test, p = 0.5, Holm–Bonferroni over genes); the same against 3x3-smoothed expression; AUROC of
top-25 % vs bottom-25 % spots; pseudo-bulk vs bulk; region-label and colour/texture baselines.
The top-N genes are chosen by mean expression over all spots, as ST-Net did (an unsupervised choice
that never looks at how well a gene is predicted).
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
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.predictions import write_predictions

QC_FEATURES = ["mean_r", "mean_g", "mean_b", "sharpness", "density", "background_frac"]
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))


def gene_spec(v: str) -> str:
    """Validate --genes: top:N, all, a file or a comma list (checked against the counts at fit time)."""
    kind, _, n = v.partition(":")
    if kind == "top" and not (n.isdigit() and int(n) > 0):
        raise HefeatError(f"--genes top:N needs N > 0, got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class SpotsParams(Params):
    """Parameters of `hefeat fit spots` (recorded with the model)."""

    extraction_id: str = param(help="An extraction on a spot tiling.", flag="--extraction")
    genes: str = param("top:250", "top:N by mean, all, a file or a comma list.", parse=gene_spec, file=True)
    head: str = param("ridge", "ridge (per-gene LOO penalty) or mlp.", choices=("ridge", "mlp"))
    cv: str = param("leave-one-patient-out", "Cross-validation (ST-Net: leave-one-patient-out).",
                    choices=("leave-one-patient-out",))
    alphas: tuple[float, ...] = param(DEFAULT_ALPHAS, "Candidate ridge penalties (--head ridge).")
    mlp_hidden: int = param(256, "Hidden units of the MLP head.")
    mlp_dropout: float = param(0.2, "Dropout of the MLP head.")
    mlp_epochs: int = param(60, "Epochs of the MLP head.")
    mlp_lr: float = param(1e-3, "Adam learning rate of the MLP head.")
    mlp_weight_decay: float = param(1e-4, "Adam weight decay of the MLP head.")
    mlp_batch_size: int = param(64, "Spots per step of the MLP head.")
    region_labels: str | None = param(None, "CSV/Parquet slide_id, spot_id, label for the region baseline.", file=True)
    bulk_dataset: str | None = param("expression", "Bulk dataset for pseudo-bulk (none: skip).", flag="--bulk")
    map_genes: int = param(20, "Genes (best first) whose spot predictions are written for maps.")
    alpha: float = param(0.05, "Significance level of the sign test after Holm's correction.")
    seed: int = param(0, "Seed of the MLP head.")

    def validate(self) -> None:
        gene_spec(self.genes)
        if not self.alphas or min(self.alphas) <= 0:
            raise HefeatError("--alphas must be positive penalties")
        for name in ("mlp_hidden", "mlp_epochs", "mlp_batch_size", "map_genes"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_range("--mlp-dropout", self.mlp_dropout, 0, 1, hi_open=True)
        check_range("--mlp-lr", self.mlp_lr, 0, lo_open=True)
        check_range("--alpha", self.alpha, 0, 1, lo_open=True, hi_open=True)

    def estimator(self):
        """The spot head with these hyperparameters."""
        if self.head == "ridge":
            from hefeat.learn.ridge import RidgeHeads

            return RidgeHeads(self.alphas)
        from hefeat.learn.nets import SpotMLP

        return SpotMLP(self.mlp_hidden, dropout=self.mlp_dropout, epochs=self.mlp_epochs, lr=self.mlp_lr,
                       weight_decay=self.mlp_weight_decay, batch_size=self.mlp_batch_size, random_state=self.seed)


@dataclass
class SpotData:
    """Spots (rows) with their patient, grid position, embeddings, QC features and targets."""

    meta: pd.DataFrame
    X: np.ndarray
    Q: np.ndarray
    Y: np.ndarray
    genes: list[str]


def spot_targets(counts: np.ndarray) -> np.ndarray:
    """ST-Net's target: log((counts + 1) / spot total of counts + 1)."""
    c = np.asarray(counts, float) + 1.0
    return np.log(c / c.sum(1, keepdims=True))


def load_spots(store: Store, eid: str, genes_spec: str) -> SpotData:
    """Spot embeddings (extraction on a spot tiling) joined to spot counts and patients."""
    ext = store.extraction(eid)
    tiling = store.tiling(ext["tiling_id"])
    if not tiling.get("spots"):
        raise HefeatError(f"Extraction {eid} is on tiling {ext['tiling_id']}, which is not a spot tiling "
                          "(hefeat tile --spots, then extract on it)")
    fi = store.sql("SELECT slide_id FROM features_index WHERE extraction_id = ? ORDER BY 1", [eid])["slide_id"]
    if fi.empty:
        raise HefeatError(f"Extraction {eid} has no finished slides")
    counts = store.sql("SELECT slide_id, spot_id, gene, count FROM spot_counts")
    if counts.empty:
        raise HefeatError("No spot counts in the store; ingest them with hefeat ingest spots")
    wide = counts.pivot_table(index=["slide_id", "spot_id"], columns="gene", values="count", aggfunc="first")
    pats = store.sql("SELECT slide_id, patient_id FROM slides").set_index("slide_id")["patient_id"]
    from hefeat.learn.data import slide_tiles

    metas, Xs = [], []
    for st in slide_tiles(store, eid, list(fi), columns=("spot_id", "row", "col", *QC_FEATURES)):
        metas.append(st.tiles.assign(slide_id=st.slide_id, patient_id=pats[st.slide_id]))
        Xs.append(st.X)
    meta = pd.concat(metas, ignore_index=True)
    X = np.concatenate(Xs)
    key = pd.MultiIndex.from_frame(meta[["slide_id", "spot_id"]])
    have = key.isin(wide.index)
    if not have.any():
        raise HefeatError("No spot of this extraction has counts (spot ids do not match)")
    meta, X = meta[have].reset_index(drop=True), X[have]
    C = wide.loc[pd.MultiIndex.from_frame(meta[["slide_id", "spot_id"]])].to_numpy(float)
    Y = spot_targets(np.nan_to_num(C))
    names = list(wide.columns)
    kind, _, n = genes_spec.partition(":")
    if kind == "top":
        order = np.argsort(-Y.mean(0), kind="stable")[: int(n or 250)]
    elif kind == "all":
        order = np.arange(len(names))
    else:
        wanted = [g.strip() for g in Path(genes_spec).read_text().split()] if Path(genes_spec).exists() else genes_spec.split(",")
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise HefeatError(f"Genes not in the spot counts: {', '.join(missing[:10])}")
        order = np.array([names.index(g) for g in wanted])
    return SpotData(meta=meta, X=X, Q=meta[QC_FEATURES].to_numpy(float), Y=Y[:, order], genes=[names[i] for i in order])


def smooth3x3(meta: pd.DataFrame, Y: np.ndarray) -> np.ndarray:
    """Mean of each spot's 3x3 grid neighbourhood (same slide, present spots only)."""
    out = np.empty_like(Y)
    for _sid, g in meta.groupby("slide_id").groups.items():
        idx = np.asarray(g)
        rc = meta.loc[idx, ["row", "col"]].to_numpy()
        pos = {(int(r), int(c)): i for i, (r, c) in zip(idx, rc, strict=True)}
        for i, (r, c) in zip(idx, rc, strict=True):
            nb = [pos[(r + dr, c + dc)] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (r + dr, c + dc) in pos]
            out[i] = Y[nb].mean(0)
    return out


def _region_labels(store: Store, meta: pd.DataFrame, path: str | None) -> np.ndarray | None:
    if not path:
        return None
    from hefeat.store.ingest import read_table

    lab = read_table(path)
    if not {"slide_id", "spot_id", "label"} <= set(lab.columns):
        raise HefeatError("--region-labels needs columns slide_id, spot_id, label")
    m = meta[["slide_id", "spot_id"]].merge(lab.astype({"slide_id": str, "spot_id": str}), how="left")
    return m["label"].astype(str).to_numpy()


def fit_spots(store: Store, p: SpotsParams, model_id: str) -> FitResult:
    """Leave-one-patient-out spot heads with ST-Net's evaluation; metrics and spot predictions."""
    from sklearn.base import clone

    from hefeat.learn.ridge import fit_ridge_heads
    from hefeat.learn.splits import assert_disjoint, leave_one_group_out

    d = load_spots(store, p.extraction_id, p.genes)
    patients = d.meta["patient_id"].to_numpy().astype(str)
    n_pat = len(np.unique(patients))
    if n_pat < 3:
        raise NotEstimable(f"Leave-one-patient-out needs spots from at least 3 patients, found {n_pat}")
    region = _region_labels(store, d.meta, p.region_labels)
    folds = leave_one_group_out(patients)
    pred = np.zeros_like(d.Y)
    base_qc = np.zeros_like(d.Y)
    base_region = np.zeros_like(d.Y) if region is not None else None
    history = []
    base = p.estimator()
    for f in folds:
        assert_disjoint(patients, f.train, f.test)
        est = clone(base).fit(d.X[f.train], d.Y[f.train])
        pred[f.test] = est.predict(d.X[f.test])
        if hasattr(est, "history_"):
            history.append(est.history_.assign(fold=f.name))
        qm, qs = d.Q[f.train].mean(0), d.Q[f.train].std(0) + 1e-9
        base_qc[f.test] = fit_ridge_heads((d.Q[f.train] - qm) / qs, d.Y[f.train]).predict((d.Q[f.test] - qm) / qs)
        if region is not None:
            means = pd.DataFrame(d.Y[f.train]).groupby(region[f.train]).mean()
            base_region[f.test] = means.reindex(region[f.test]).fillna(pd.Series(d.Y[f.train].mean(0))).to_numpy()
    smooth = smooth3x3(d.meta, d.Y)
    per = _per_patient(d, patients, {"model": pred, "qc_baseline": base_qc,
                                     **({"region_baseline": base_region} if base_region is not None else {})}, smooth)
    genes = _per_gene(per, d, pred, patients, p.alpha)
    bulk = _pseudo_bulk(store, p.bulk_dataset, d, pred)
    if bulk is not None:
        genes = genes.merge(bulk, on="gene", how="left")
    n_work = int(genes["works"].sum())
    summary = {"extraction_id": p.extraction_id, "n_spots": int(len(d.Y)),
               "n_patients": n_pat, "n_genes": len(d.genes), "genes_passing_sign_test": n_work, "alpha": p.alpha,
               "median_r_model": float(genes["mean_r_model"].median()),
               "median_r_qc_baseline": float(genes["mean_r_qc_baseline"].median()),
               "median_auroc": float(genes["auroc_top_bottom_25"].median()), "split": "leave-one-patient-out",
               "head": p.head}
    if base_region is not None:
        summary["median_r_region_baseline"] = float(genes["mean_r_region_baseline"].median())
    notes = []
    n_eval = int(genes["n_patients"].max()) if len(genes) else 0
    if n_eval and 0.5 ** n_eval * len(d.genes) >= p.alpha:
        need = int(np.ceil(np.log2(len(d.genes) / p.alpha)))
        notes.append(f"with {n_eval} patients the smallest sign-test p is {0.5 ** n_eval:.2g}: after Holm over "
                     f"{len(d.genes)} genes no gene can pass at {p.alpha:g}; {need} patients (or fewer genes) are needed")
    _write_spot_predictions(store, model_id, d, pred, genes, base_qc, p.map_genes)
    tables = {"metrics": genes, "per_patient": per}
    if history:
        tables["training"] = pd.concat(history, ignore_index=True)
    return FitResult(summary=summary, tables=tables, extraction_id=p.extraction_id, notes=notes)


def _per_patient(d: SpotData, patients: np.ndarray, preds: dict[str, np.ndarray], smooth: np.ndarray) -> pd.DataFrame:
    from hefeat.learn.stats import columnwise_pearson

    rows = []
    for pat in np.unique(patients):
        m = patients == pat
        if m.sum() < 3:
            continue
        for name, P in preds.items():
            r = columnwise_pearson(P[m], d.Y[m])
            rmse = np.sqrt(((P[m] - d.Y[m]) ** 2).mean(0))
            rs = columnwise_pearson(P[m], smooth[m])
            rows.append(pd.DataFrame({"gene": d.genes, "patient_id": pat, "predictor": name, "n_spots": int(m.sum()),
                                      "r": r, "rmse": rmse, "r_smoothed": rs}))
    return pd.concat(rows, ignore_index=True)


def _auroc_top_bottom(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    out = np.full(Y.shape[1], np.nan)
    for j in range(Y.shape[1]):
        lo, hi = np.quantile(Y[:, j], [0.25, 0.75])
        sel = (Y[:, j] <= lo) | (Y[:, j] >= hi)
        lab = Y[sel, j] >= hi
        if 0 < lab.sum() < len(lab):
            out[j] = roc_auc_score(lab, P[sel, j])
    return out


def _per_gene(per: pd.DataFrame, d: SpotData, pred: np.ndarray, patients: np.ndarray, alpha: float) -> pd.DataFrame:
    from hefeat.learn.stats import correct, sign_test

    m = per[per["predictor"] == "model"]
    g = m.groupby("gene", sort=False)
    out = pd.DataFrame({"gene": d.genes}).set_index("gene")
    out["n_patients"] = g["r"].count()
    out["n_positive"] = g["r"].apply(lambda r: int((r > 0).sum()))
    out["n_positive_smoothed"] = g["r_smoothed"].apply(lambda r: int((r > 0).sum()))
    out["sign_p"] = [sign_test(int(a), int(n)) for a, n in zip(out["n_positive"], out["n_patients"], strict=True)]
    out["sign_p_smoothed"] = [sign_test(int(a), int(n)) for a, n in zip(out["n_positive_smoothed"], out["n_patients"], strict=True)]
    out["sign_p_holm"] = correct(out["sign_p"].to_numpy(), "holm")
    out["sign_p_smoothed_holm"] = correct(out["sign_p_smoothed"].to_numpy(), "holm")
    out["works"] = out["sign_p_holm"] < alpha
    for name in per["predictor"].unique():
        out[f"mean_r_{name}"] = per[per["predictor"] == name].groupby("gene")["r"].mean()
    out["mean_r_smoothed"] = g["r_smoothed"].mean()
    out["mean_rmse"] = g["rmse"].mean()
    out["auroc_top_bottom_25"] = _auroc_top_bottom(pred, d.Y)
    out["split"] = "leave-one-patient-out"
    return out.reset_index()


def _pseudo_bulk(store: Store, dataset: str | None, d: SpotData, pred: np.ndarray) -> pd.DataFrame | None:
    """Mean spot prediction per slide vs bulk expression of the same slide (Pearson across slides)."""
    if not dataset:
        return None
    try:
        from hefeat.learn.data import expression_table

        bulk = expression_table(store, dataset)
    except HefeatError:
        return None
    smap = store.sql("SELECT sample_id, slide_id FROM samples WHERE dataset = ?", [dataset]).drop_duplicates("slide_id")
    pb = pd.DataFrame(pred, columns=d.genes).groupby(d.meta["slide_id"].to_numpy()).mean()
    pb = pb.join(smap.set_index("slide_id"), how="inner")
    genes = [g for g in d.genes if g in bulk.columns]
    if len(pb) < 3 or not genes:
        return None
    from hefeat.learn.stats import columnwise_pearson, r_pvalue

    meas = np.log1p(bulk.loc[pb["sample_id"], genes].to_numpy(float))
    r = columnwise_pearson(pb[genes].to_numpy(), meas)

    return pd.DataFrame({"gene": genes, "pseudo_bulk_r": r, "pseudo_bulk_p": r_pvalue(r, len(pb)),
                         "pseudo_bulk_slides": len(pb)})


def _write_spot_predictions(store: Store, mid: str, d: SpotData, pred: np.ndarray, genes: pd.DataFrame,
                            baseline: np.ndarray | None = None, n_genes: int = 20) -> None:
    top = genes.sort_values("mean_r_model", ascending=False)["gene"].head(n_genes).tolist()
    cols = [d.genes.index(g) for g in top]
    with write_predictions(store, mid) as write_pred:
        for sid, idx in d.meta.groupby("slide_id").groups.items():
            idx = np.asarray(idx)
            m = d.meta.loc[idx, ["tile_id", "spot_id", "x", "y", "row", "col"]].reset_index(drop=True)
            parts = [m, pd.DataFrame(pred[np.ix_(idx, cols)], columns=top),
                     pd.DataFrame(d.Y[np.ix_(idx, cols)], columns=[f"measured_{g}" for g in top])]
            if baseline is not None:  # the colour/texture baseline's held-out prediction, drawn next to the model's
                parts.append(pd.DataFrame(baseline[np.ix_(idx, cols)], columns=[f"baseline_{g}" for g in top]))
            df = pd.concat(parts, axis=1)
            df.insert(0, "slide_id", sid)
            df.insert(0, "model_id", mid)
            write_pred(sid, df)


TARGET_UNITS = "log share of the spot's counts, log((n+1)/Σ(n+1))"


def spot_maps(store: Store, mid: str, slide_id: str, gene: str, out: str | Path, *, why: str | None = None) -> dict:
    """Measured, predicted and colour/texture-baseline expression of a gene on a slide's spots over its H&E (PNG).

    why: how the gene was chosen, stated in the title (e.g. "best of 50 genes by held-out r").
    """
    from hefeat.figures.spatial import spot_map
    from hefeat.slides.thumbnail import slide_image, spot_discs

    p = store.predictions_path(mid, slide_id)
    if not p.exists():
        raise HefeatError(f"Model {mid} has no spot predictions for slide {slide_id}")
    df = pd.read_parquet(p)
    if gene not in df.columns:
        mapped = [c.removeprefix("measured_") for c in df.columns if c.startswith("measured_")]
        raise HefeatError(f"Gene {gene} is not among the mapped genes of {mid}: {', '.join(mapped)[:200]}")
    from hefeat.learn.models import load_model, load_table

    meta = load_model(store, mid)
    tid = store.extraction(meta["extraction_id"])["tiling_id"]
    df = df.merge(store.tiles(tid, slide_id)[["tile_id", "size0"]], on="tile_id", how="left")
    c, diameter = spot_discs(df)
    rows = store.slides([slide_id]).iloc[0]
    mpp = max(float(rows["width"]), float(rows["height"])) * float(rows["mpp_x"]) / 1400
    img = slide_image(store, slide_id, mpp)

    def r_of(col: str) -> float:
        return float(np.corrcoef(df[col], df[f"measured_{gene}"])[0, 1])

    r = r_of(gene)
    panels = {"measured": df[f"measured_{gene}"].to_numpy(), f"predicted (r = {r:.2f})": df[gene].to_numpy()}
    rb = None
    if f"baseline_{gene}" in df.columns:
        rb = r_of(f"baseline_{gene}")
        panels[f"colour/texture baseline (r = {rb:.2f})"] = df[f"baseline_{gene}"].to_numpy()
    m = load_table(store, mid, "metrics").set_index("gene")
    cohort = ""
    if gene in m.index:
        g = m.loc[gene]
        cohort = (f"; mean r over held-out patients: model {g['mean_r_model']:.2f} vs colour/texture baseline "
                  f"{g['mean_r_qc_baseline']:.2f}")
    title = f"{gene} on slide {slide_id}" + (f" ({why})" if why else "")
    note = (f"r: Pearson correlation with the measured values over this slide's {len(df)} spots; predictions are "
            f"leave-one-patient-out{cohort}." + ("" if rb is not None else " The colour/texture baseline's map is not "
                                                 "stored with this model (refit to draw it)."))
    res = spot_map(img, c, diameter, panels, label=TARGET_UNITS, title=title, note=note, out=out)
    return {"out": str(out), "r": r, "r_baseline": rb, "spots": len(df), **res}



def headline(s: dict) -> str:
    """ST-Net's headline: genes passing the sign test over held-out patients, median r vs the baseline."""
    return (f"{s['genes_passing_sign_test']} of {s['n_genes']} genes have r > 0 in enough of {s['n_patients']} "
            f"patients (binomial sign test, Holm, {s.get('alpha', 0.05):g}; leave-one-patient-out); median r "
            f"{s['median_r_model']:.3f} vs colour/texture baseline {s['median_r_qc_baseline']:.3f}")


def _file_input(store: Store, p: SpotsParams) -> dict:
    """The region-label file's content is an input of the baseline."""
    if not p.region_labels:
        return {}
    import hashlib

    path = Path(p.region_labels)
    if not path.exists():
        raise HefeatError(f"--region-labels file not found: {p.region_labels}")
    return {"region_labels": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def _units(column: str) -> str:
    for prefix in ("measured", "baseline"):
        if column.startswith(prefix + "_"):
            return f"{prefix} {TARGET_UNITS}"
    return f"predicted {TARGET_UNITS}"


def spot_map_plot(store: Store, mid: str, out: Path) -> list[Path]:
    """Map of the best gene on the slide with the most spots: measured, predicted, baseline."""
    from hefeat.learn.models import load_table

    m = load_table(store, mid, "metrics")
    gene = m.sort_values("mean_r_model", ascending=False)["gene"].iloc[0]
    n = store.sql("SELECT slide_id, count(*) AS n FROM predictions WHERE model_id = ? GROUP BY 1", [mid])
    if n.empty:
        return []
    sid = max(zip(n["n"], n["slide_id"], strict=True))[1]  # most spots; ties to the last slide id
    f = out / layout.FIG_SPOT_MAP
    spot_maps(store, mid, sid, gene, f, why=f"best of {len(m)} genes by mean held-out r; slide with the most spots")
    return [f]


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    from hefeat.learn.report import learning_curve_plot

    return spot_map_plot(store, mid, out) + learning_curve_plot(store, mid, out, "training")


register(Method(
    name="spots", prefix="spt-", params=SpotsParams, fit=fit_spots, headline=headline, plots=_plots,
    inputs=_file_input, units=lambda params, col: _units(col),
    summary="ST-Net-style spot heads, leave-one-patient-out, sign test over patients.",
    example="hefeat fit spots --extraction e5678 --genes top:250 --cv leave-one-patient-out",
))
