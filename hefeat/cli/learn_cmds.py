"""Stage-2 commands: fit, predict, report, cartography, hti, survival."""

from __future__ import annotations

from pathlib import Path

import click

from hefeat.cli.common import (
    emit,
    get_store,
    json_option,
    main,
    split_ids,
    store_option,
)
from hefeat.errors import HefeatError


# ---------------------------------------------------------------------------------------------
def _load_config(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise HefeatError(f"Config not found: {path}")
    cfg = yaml.safe_load(p.read_text()) or {}
    if "method" not in cfg:
        raise HefeatError(f"Config {path} needs a 'method' key (genes, he2rna, transfer, spots, traits, receptors)")
    return cfg


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", default=None, help="A recipe (configs/*.yaml) naming method and parameters.")
@click.option("--extraction", "extraction_id", default=None, help="With --config: the extraction to fit on.")
@click.option("--truth", default=None, help="With --config: a synthetic cohort's truth.json.")
@store_option
@json_option
@click.pass_context
def fit(ctx, config_path, extraction_id, truth, store_path, as_json):
    """Fit a model from the store: genes (EMO), he2rna, transfer, ...

    \b
    Example:
      hefeat fit genes --extraction e1234 --split patient-kfold:5
      hefeat fit --config configs/emo.yaml --extraction e1234
    """
    if ctx.invoked_subcommand is not None:
        return
    if not config_path:
        click.echo(ctx.get_help())
        return
    from hefeat.learn.recipes import run_recipe

    over = {k: v for k, v in {"extraction_id": extraction_id, "truth": truth}.items() if v}
    s = run_recipe(get_store(store_path), _load_config(config_path), overrides=over)
    emit(s, as_json, _fit_text(s))


def _fit_text(s: dict) -> str:
    keys = [k for k in ("n_genes", "n_significant", "n_r2_above_0.2", "signal_recall", "null_false_calls",
                        "proliferation_spearman_r", "median_pearson_r", "auc") if k in s]
    vals = ", ".join(f"{k} = {s[k]:.3g}" if isinstance(s[k], float) else f"{k} = {s[k]}" for k in keys)
    cached = " (already fitted: loaded from the store)" if s.get("cached") else ""
    return f"Model {s['model_id']} ({s.get('kind')}){cached}: {vals}. Report: hefeat report {s['model_id']}"


@fit.command("genes")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--target", "dataset", default="expression", show_default=True, help="Expression dataset name.")
@click.option("--genes", default="all", show_default=True, help="all, or a file with one gene per line.")
@click.option("--min-variance", default=0.01, show_default=True, help="Keep genes with training variance above this.")
@click.option("--median-positive", is_flag=True, help="Also require training median > 0.")
@click.option("--transform", type=click.Choice(["log1p", "log10p", "log2p", "none"]), default="log1p", show_default=True)
@click.option("--split", default="patient-kfold:5", show_default=True, help="patient-kfold:K or holdout:FILE.")
@click.option("--level", type=click.Choice(["slide", "tile"]), default="slide", show_default=True)
@click.option("--pca", type=int, default=None, help="Principal components of the features fitted first.")
@click.option("--cohort-col", default=None, help="Median-shift cohorts defined by this column (EMO), e.g. site.")
@click.option("--unit", type=click.Choice(["sample", "patient"]), default="sample", show_default=True,
              help="patient: average a patient's slides and samples into one row.")
@click.option("--permutations", default=0, show_default=True, help="Permuted-target refits for an empirical null.")
@click.option("--seed", default=0, show_default=True)
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default=None, help="Synthetic truth.json.")
@click.option("--force", is_flag=True, help="Refit even if this exact model exists.")
@store_option
@json_option
def fit_genes_cmd(extraction_id, dataset, genes, min_variance, median_positive, transform, split, level, pca,
                  cohort_col, unit, permutations, seed, truth, force, store_path, as_json):
    """Per-gene ridge heads on slide-mean embeddings (EMO-average), cross-validated by patient.

    \b
    Example:
      hefeat fit genes --extraction e1234 --truth data/demo/truth.json --json
    """
    from hefeat.learn.emo import GenesParams, fit_genes

    gene_list = None if genes == "all" else [g.strip() for g in Path(genes).read_text().split() if g.strip()]
    p = GenesParams(extraction_id=extraction_id, dataset=dataset, genes=gene_list, min_variance=min_variance,
                    median_positive=median_positive, transform=transform, split=split, level=level, pca=pca,
                    cohort_col=cohort_col, unit=unit, permutations=permutations, seed=seed)
    s = fit_genes(get_store(store_path), p, truth=truth, force=force)
    emit(s, as_json, _fit_text(s))


@fit.command("he2rna")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--target", "dataset", default="expression", show_default=True)
@click.option("--supertiles", default=100, show_default=True, help="Super-tiles per slide (0 = train on all tiles).")
@click.option("--ks", default=None, help="Comma-separated k list (default 1,2,5,...,100 or the all-tiles list).")
@click.option("--hidden", default="256", show_default=True, help="Hidden layer sizes, comma-separated.")
@click.option("--dropout", default=0.25, show_default=True)
@click.option("--epochs", default=100, show_default=True)
@click.option("--patience", default=10, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--folds", default=5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--force", is_flag=True)
@store_option
@json_option
def fit_he2rna_cmd(extraction_id, dataset, supertiles, ks, hidden, dropout, epochs, patience, lr, folds, seed, truth,
                   force, store_path, as_json):
    """HE2RNA: super-tiles, per-tile MLP, random top-k; 5-fold patient CV vs an untrained-model null.

    \b
    Example:
      hefeat fit he2rna --extraction e1234 --supertiles 100 --ks 1,2,5,10,20,50,100
    """
    from hefeat.learn.he2rna import ALL_TILE_KS, SUPERTILE_KS, He2rnaParams, fit_he2rna

    k_list = [int(k) for k in ks.split(",")] if ks else list(SUPERTILE_KS if supertiles else ALL_TILE_KS)
    p = He2rnaParams(extraction_id=extraction_id, dataset=dataset, supertiles=supertiles or None, ks=k_list,
                     hidden=[int(h) for h in hidden.split(",")], dropout=dropout, epochs=epochs, patience=patience,
                     lr=lr, folds=folds, seed=seed)
    s = fit_he2rna(get_store(store_path), p, truth=truth, force=force)
    emit(s, as_json, _fit_text(s))


@fit.command("transfer")
@click.option("--from", "from_model", required=True, help="An expression model (genes or he2rna) trained on the store.")
@click.option("--label", required=True, help="Binary clinical column, e.g. msi_status.")
@click.option("--b-shares", default="0.3,0.5", show_default=True, help="Sizes of hospital B (share of patients).")
@click.option("--splits", "n_splits", default=10, show_default=True, help="Random A/B splits per size (paper: 50).")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def fit_transfer_cmd(from_model, label, b_shares, n_splits, seed, force, store_path, as_json):
    """Transcriptomic representation (hospital A) vs raw features vs autoencoder for a label at hospital B.

    \b
    Example:
      hefeat fit transfer --from gen-0123abcd --label msi_status --splits 50
    """
    from hefeat.learn.transfer import TransferParams, fit_transfer

    p = TransferParams(from_model=from_model, label=label, b_shares=[float(x) for x in b_shares.split(",")],
                       n_splits=n_splits, seed=seed)
    s = fit_transfer(get_store(store_path), p, force=force)
    text = f"Transfer {s['model_id']} ({label}): " + ", ".join(f"{k} = {v:.3f}" for k, v in s.items() if k.startswith("auc_"))
    for t in s.get("tests", []):
        text += f"\n  B share {t['b_share']}: {t['comparison']}: median AUC diff {t['median_diff']:+.3f}, Wilcoxon p = {t['wilcoxon_p']:.3g}"
    emit(s, as_json, text)


@fit.command("spots")
@click.option("--extraction", "extraction_id", required=True, help="An extraction on a spot tiling.")
@click.option("--genes", default="top:250", show_default=True, help="top:N by mean, all, a file or a comma list.")
@click.option("--head", type=click.Choice(["ridge", "mlp"]), default="ridge", show_default=True)
@click.option("--cv", type=click.Choice(["leave-one-patient-out"]), default="leave-one-patient-out", show_default=True)
@click.option("--region-labels", default=None, help="CSV/Parquet slide_id, spot_id, label for the region baseline.")
@click.option("--bulk", "bulk_dataset", default="expression", show_default=True, help="Bulk dataset for pseudo-bulk.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def fit_spots_cmd(extraction_id, genes, head, cv, region_labels, bulk_dataset, seed, force, store_path, as_json):
    """ST-Net-style spot heads, leave-one-patient-out, sign test over patients.

    \b
    Example:
      hefeat fit spots --extraction e5678 --genes top:250 --cv leave-one-patient-out
    """
    from hefeat.learn.spots import SpotsParams, fit_spots

    s = fit_spots(get_store(store_path), SpotsParams(extraction_id=extraction_id, genes=genes, head=head,
                                                  region_labels=region_labels, bulk_dataset=bulk_dataset, seed=seed),
                  force=force)
    emit(s, as_json, f"Spot model {s['model_id']}: {s['genes_passing_sign_test']} of {s['n_genes']} genes pass the sign "
         f"test over {s['n_patients']} patients (Holm); median r {s['median_r_model']:.3f} "
         f"(colour/texture baseline {s['median_r_qc_baseline']:.3f}).")


@fit.command("traits")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--trait", "traits", multiple=True, required=True, help="Gene/miRNA of the expression table; repeat.")
@click.option("--exclude-mid", default="20,80", show_default=True, help="Percentiles kept out of training (OOD).")
@click.option("--splits", default=5, show_default=True)
@click.option("--test-share", default=0.1, show_default=True)
@click.option("--head", type=click.Choice(["logistic", "mlp"]), default="logistic", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def fit_traits_cmd(extraction_id, traits, exclude_mid, splits, test_share, head, seed, force, store_path, as_json):
    """PathoMCH trait tile classifiers; binary trait maps for every slide.

    \b
    Example:
      hefeat fit traits --extraction e1234 --trait MKI67 --trait miR-17 --exclude-mid 20,80
    """
    from hefeat.learn.traits import TraitsParams, fit_traits

    lo, hi = (float(x) for x in exclude_mid.split(","))
    s = fit_traits(get_store(store_path), TraitsParams(extraction_id=extraction_id, traits=list(traits),
                                                    exclude_mid=[lo, hi], splits=splits, test_share=test_share,
                                                    head=head, seed=seed), force=force)
    text = f"Traits model {s['model_id']}: " + ", ".join(f"{k} = {v:.3f}" for k, v in s.items() if "auc" in k and isinstance(v, float))
    emit(s, as_json, text)


@fit.command("receptors")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--label", required=True, help="Clinical column: er_status, pr_status, her2_status, pam50, ...")
@click.option("--split", type=click.Choice(["site"]), default="site", show_default=True)
@click.option("--tiles", default="top:200", show_default=True, help="top:N densest tiles per slide, or all.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def fit_receptors_cmd(extraction_id, label, split, tiles, seed, force, store_path, as_json):
    """Site-grouped slide classifiers (Ektefaie et al.): patient AUC with a 95 % bootstrap CI.

    \b
    Example:
      hefeat fit receptors --extraction e1234 --label er_status --split site --tiles top:200
    """
    from hefeat.learn.receptors import ReceptorParams, fit_receptors

    s = fit_receptors(get_store(store_path), ReceptorParams(extraction_id=extraction_id, label=label, split=split,
                                                         tiles=tiles, seed=seed), force=force)
    if "patient_auc_ci_low" in s:
        text = (f"Receptor model {s['model_id']} ({label}): patient AUC {s['patient_auc']:.3f} "
                f"[{s['patient_auc_ci_low']:.3f}, {s['patient_auc_ci_high']:.3f}] on test sites {s['test_sites']}")
    else:
        text = f"Receptor model {s['model_id']} ({label}): top-1 {s['top1']:.3f}, top-2 {s['top2']:.3f}"
    emit(s, as_json, text)


@main.command()
@click.argument("model_id")
@click.option("--slide", required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@store_option
@json_option
def cartography(model_id, slide, out, store_path, as_json):
    """Per-trait and combined trait maps of a slide (PNG) from a traits model.

    \b
    Example:
      hefeat cartography tra-0123abcd --slide S01 --out map.png
    """
    from hefeat.learn.traits import cartography as carto

    s = carto(get_store(store_path), model_id, slide, out)
    emit(s, as_json, f"Cartography of {slide} ({s['tiles']} tiles, HTI {s['hti']:.3f}): {out}")


@main.command()
@click.argument("model_id")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write .parquet or .csv here.")
@store_option
@json_option
def hti(model_id, out, store_path, as_json):
    """Heterogeneity index per slide from a traits model, joined with clinical data.

    \b
    Example:
      hefeat hti tra-0123abcd --out hti.parquet
    """
    from hefeat.learn.traits import hti_table

    df = hti_table(get_store(store_path), model_id, out)
    s = {"model_id": model_id, "n_slides": len(df), "hti": df[["slide_id", "hti"]].to_dict("records"),
         "mean_hti": float(df["hti"].mean())}
    emit(s, as_json, f"HTI for {len(df)} slides (mean {s['mean_hti']:.3f})" + (f": {out}" if out else "") + "\n"
         + df[["slide_id", "hti", "positive_tiles"]].to_string(index=False))


@main.command()
@click.option("--model", "model_id", default=None, help="Traits model (default: the latest).")
@click.option("--by", default="hti", show_default=True)
@click.option("--threshold", default=0.5, show_default=True)
@click.option("--time-col", default="survival_months", show_default=True)
@click.option("--event-col", default="event", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Kaplan–Meier PNG.")
@store_option
@json_option
def survival(model_id, by, threshold, time_col, event_col, out, store_path, as_json):
    """Kaplan–Meier curves and log-rank test for HTI above vs below a threshold.

    \b
    Example:
      hefeat survival --by hti --threshold 0.5 --out km.png
    """
    from hefeat.learn.traits import survival as surv

    st = get_store(store_path)
    if not model_id:
        m = st.sql("SELECT model_id FROM models WHERE kind = 'traits' ORDER BY created DESC")
        if m.empty:
            raise HefeatError("No traits model in the store; run hefeat fit traits first")
        model_id = m["model_id"].iloc[0]
    s = surv(st, model_id, by=by, threshold=threshold, time_col=time_col, event_col=event_col, out=out)
    emit(s, as_json, f"{by} > {threshold}: {s['n_high']} patients vs {s['n_low']}; log-rank p = {s['logrank_p']:.3g}"
         + (f"; plot {out}" if out else ""))


@main.command()
@click.argument("model_id")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: all with features).")
@click.option("--top", default=20, show_default=True, help="Genes (best first) with tile-level predictions.")
@store_option
@json_option
def predict(model_id, slides, top, store_path, as_json):
    """Slide- and tile-level predictions of a model, written into the store (predictions view).

    \b
    Example:
      hefeat predict gen-0123abcd --top 10
    """
    from hefeat.learn.predict import predict_model

    s = predict_model(get_store(store_path), model_id, slides=split_ids(slides), top=top)
    emit(s, as_json, f"Predictions of {model_id}: {s['slides']} slides, {s['tiles']} tiles. "
         f"Query: hefeat sql \"SELECT * FROM predictions WHERE model_id = '{model_id}'\"")


@main.command("report")
@click.argument("model_id")
@click.option("--out", default=None, help="Folder for the PNG plots (default: the model's folder).")
@store_option
@json_option
def report_cmd(model_id, out, store_path, as_json):
    """Metrics, plots (PNG) and the headline of a fitted model.

    \b
    Example:
      hefeat report gen-0123abcd
    """
    from hefeat.learn.report import report

    s = report(get_store(store_path), model_id, out)
    emit(s, as_json, s["headline"] + "\nPlots: " + ", ".join(s["files"]))


