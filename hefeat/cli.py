"""The hefeat command line: parse, call one public function, render a summary or --json."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from hefeat.errors import HefeatError

STORE_HELP = "Store directory (default: $HEFEAT_STORE or stores/default)."


class HefeatGroup(click.Group):
    """Turns library errors into one-line click errors, in one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HefeatError as e:
            raise click.ClickException(str(e)) from None


def store_option(f):
    """--store PATH on every command."""
    return click.option("--store", "store_path", default=None, envvar="HEFEAT_STORE", help=STORE_HELP)(f)


def json_option(f):
    """--json: print the summary as one JSON object."""
    return click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")(f)


def _store(path: str | None, *, create: bool = False):
    from hefeat.store.catalog import DEFAULT_STORE, Store, open_store

    if create:
        return Store.init(path or DEFAULT_STORE)
    return open_store(path)


def emit(summary: dict, as_json: bool, text: str) -> None:
    """Print a summary paragraph, or the summary as JSON."""
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(text)


def _progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def _run_text(s: dict, what: str) -> str:
    parts = [f"{what}: {s['ok']} slides done, {s['already_done']} already done, {len(s['skipped'])} skipped, "
             f"{len(s['failed'])} failed; {s['tiles']} tiles in {s['seconds']:.1f} s ({s['tiles_per_s']:.0f} tiles/s)."]
    for sid, why in list(s["failed"].items())[:10]:
        parts.append(f"  failed {sid}: {why}")
    for sid, why in list(s["skipped"].items())[:10]:
        parts.append(f"  skipped {sid}: {why}")
    return "\n".join(parts)


@click.group(cls=HefeatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hefeat")
def main():
    """hefeat: H&E slides to a feature store, and the models fitted from it.

    \b
    Example:
      hefeat demo                 # synthetic cohort -> stores/default, end to end
      hefeat status               # what the store holds
    """


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slides", "n_slides", default=24, show_default=True, help="Number of slides.")
@click.option("--genes", "n_genes", default=200, show_default=True, help="Number of genes.")
@click.option("--signal-share", default=0.3, show_default=True, help="Share of genes driven by tissue composition.")
@click.option("--seed", default=0, show_default=True)
@click.option("--width-um", default=1600.0, show_default=True)
@click.option("--height-um", default=1200.0, show_default=True)
@json_option
def synth(out, n_slides, n_genes, signal_share, seed, width_um, height_um, as_json):
    """Write a synthetic H&E cohort with known ground truth.

    \b
    Example:
      hefeat synth data/demo --slides 24 --seed 0
    """
    from hefeat.slides.synth import make_cohort

    s = make_cohort(out, n_slides=n_slides, n_genes=n_genes, signal_share=signal_share, seed=seed,
                    width_um=width_um, height_um=height_um, progress=_progress(as_json))
    emit(s, as_json, f"Wrote {s['slides']} slides ({s['patients']} patients), {s['genes']} genes "
         f"({s['signal_genes']} signal), {s['spots']} spots and truth.json to {s['out']}.")


@main.command()
@store_option
@json_option
def init(store_path, as_json):
    """Create a store (DuckDB catalog + folders); safe to repeat.

    \b
    Example:
      hefeat init --store stores/brca
    """
    st = _store(store_path, create=True)
    emit({"store": str(st.root)}, as_json, f"Store ready at {st.root}.")


# ---------------------------------------------------------------------------------------------
@main.group()
def ingest():
    """Bring slides, expression, clinical data or spots into the store."""


@ingest.command("slides")
@click.argument("paths", nargs=-1, required=True)
@click.option("--mpp", type=float, default=None, help="Level-0 µm/px for slides that state none.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="CSV with path or slide_id, and optional patient_id, site, mpp.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first bad slide.")
@store_option
@json_option
def ingest_slides_cmd(paths, mpp, manifest, fail_fast, store_path, as_json):
    """Register slide files (any format OpenSlide reads).

    \b
    Example:
      hefeat ingest slides data/demo/slides/*.tiff
      hefeat ingest slides CMU-1-Small-Region.svs --mpp 0.499
    """
    from hefeat.store.ingest import ingest_slides

    rep = ingest_slides(_store(store_path), list(paths), mpp=mpp, manifest=manifest, fail_fast=fail_fast,
                        progress=_progress(as_json))
    d = rep.to_dict()
    text = f"Ingested {d['added']} slides ({d['unchanged']} already there, {len(d['failed'])} failed)."
    for p, why in rep.failed.items():
        text += f"\n  failed {p}: {why}"
    emit(d, as_json, text)
    if rep.failed and not rep.added and not rep.unchanged:
        sys.exit(1)


def _table_ingest(kind: str):
    def cmd(path, store_path, as_json, allow_unmatched, **kw):
        from hefeat.store import ingest as ing

        fn = {"expression": ing.ingest_expression, "clinical": ing.ingest_clinical, "spots": ing.ingest_spots}[kind]
        rep = fn(_store(store_path), path, allow_unmatched=allow_unmatched, **kw)
        d = rep.to_dict()
        note = f" {len(rep.unmatched)} ids matched no slide: {', '.join(rep.unmatched[:8])}." if rep.unmatched else ""
        state = "unchanged (already ingested)" if rep.unchanged else f"{d['rows']} rows"
        emit(d, as_json, f"Ingested {kind} from {path}: {state}.{note}")

    return cmd


@ingest.command("expression")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--dataset", default="expression", show_default=True, help="Name of this target table.")
@click.option("--sample-col", default=None, help="Sample id column of a wide table (default: first column).")
@click.option("--allow-unmatched", is_flag=True, help="Keep samples that match no slide (reported).")
@store_option
@json_option
def ingest_expression_cmd(path, dataset, sample_col, allow_unmatched, store_path, as_json):
    """Ingest bulk expression: wide samples x genes (CSV/TSV/Parquet) or long sample_id,gene,value.

    \b
    Example:
      hefeat ingest expression data/demo/expression.parquet
    """
    _table_ingest("expression")(path, store_path, as_json, allow_unmatched, dataset=dataset, sample_col=sample_col)


@ingest.command("clinical")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--allow-unmatched", is_flag=True)
@store_option
@json_option
def ingest_clinical_cmd(path, allow_unmatched, store_path, as_json):
    """Ingest a clinical table keyed by slide_id or patient_id (any other columns).

    \b
    Example:
      hefeat ingest clinical data/demo/clinical.csv
    """
    _table_ingest("clinical")(path, store_path, as_json, allow_unmatched)


@ingest.command("spots")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--allow-unmatched", is_flag=True)
@store_option
@json_option
def ingest_spots_cmd(path, allow_unmatched, store_path, as_json):
    """Ingest spatial spots: slide_id, spot_id, x, y (level-0 px) and one count column per gene.

    \b
    Example:
      hefeat ingest spots data/demo/spots.parquet
    """
    _table_ingest("spots")(path, store_path, as_json, allow_unmatched)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Target µm/px of the tiles.")
@click.option("--size", type=int, default=224, show_default=True, help="Tile side in pixels at --mpp.")
@click.option("--stride", type=int, default=None, help="Grid step in pixels at --mpp (default: --size).")
@click.option("--tissue-threshold", type=float, default=None, help="Minimum Otsu tissue share per tile (default 0.5).")
@click.option("--background", type=click.Choice(["otsu", "mean-rgb", "density"]), default=None,
              help="Tile rule: otsu tissue share; mean-rgb (HE2RNA/PathoMCH); density top-N (Ektefaie).")
@click.option("--max-background", type=float, default=None, help="mean-rgb rule: largest background share kept.")
@click.option("--top-n", type=int, default=None, help="density rule: tiles kept per slide (default 200).")
@click.option("--max-tiles", type=int, default=None, help="Random sample of at most N tiles per slide.")
@click.option("--seed", type=int, default=None, help="Seed of the --max-tiles sample (recorded).")
@click.option("--spots", is_flag=True, help="Spot-centred patches for slides that have spots.")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: all).")
@click.option("--shard", default=None, help="I/N: this process tiles its share of the slides.")
@click.option("--qc-thumbnails", is_flag=True, help="Write reports/qc-<tiling>/<slide>.png: mask outline and tiles.")
@click.option("--fail-fast", is_flag=True)
@store_option
@json_option
def tile(mpp, size, stride, tissue_threshold, background, max_background, top_n, max_tiles, seed, spots, slides,
         shard, qc_thumbnails, fail_fast, store_path, as_json):
    """Tile every slide at a physical resolution, with QC columns per tile.

    \b
    Example:
      hefeat tile --mpp 0.5 --size 224
      hefeat tile --mpp 0.5 --size 224 --spots
      hefeat tile --background density --top-n 200      # Ektefaie et al.
    """
    from hefeat.slides.run import run_tiling
    from hefeat.slides.tiling import TilingParams

    given = {"mpp": mpp, "size": size, "stride": stride, "tissue_threshold": tissue_threshold,
             "background": background, "max_background": max_background, "top_n": top_n,
             "max_tiles": max_tiles, "seed": seed, "spots": spots}
    params = TilingParams(**{k: v for k, v in given.items() if v is not None})
    s = run_tiling(_store(store_path), params, slides=_split(slides), shard=shard, fail_fast=fail_fast,
                   progress=_progress(as_json), qc_thumbnails=qc_thumbnails).to_dict()
    emit(s, as_json, _run_text(s, f"Tiling {s['tiling_id']}") + f"\nQuery them: hefeat sql \"SELECT * FROM tiles WHERE tiling_id = '{s['tiling_id']}'\"")
    if s["failed"] and not s["ok"] and not s["already_done"]:
        sys.exit(1)


def _split(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--encoder", default="resnet50", show_default=True, help="timm model name or hf-hub:ORG/NAME.")
@click.option("--weights", default=None, help="imagenet (default), none (random, seeded) or a weights file.")
@click.option("--layer", default=None, help="Truncate at this stage, then global-average-pool (e.g. layer3).")
@click.option("--tiling", "tiling_id", default=None, help="Tiling id (default: the store's only tissue tiling).")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: all tiled slides).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--workers", type=int, default=None, help="DataLoader workers (default: available CPUs - 1).")
@click.option("--shard", default=None, help="I/N: this process embeds its share of the slides (SLURM arrays).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--tta", is_flag=True, help="Average over the 8 rotations/reflections (ST-Net).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for --weights none.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--fail-fast", is_flag=True)
@store_option
@json_option
def extract(encoder, weights, layer, tiling_id, slides, precision, batch_size, workers, shard, engine, tta, compile_,
            dtype, seed, device, fail_fast, store_path, as_json):
    """Embed every tile of a tiling into per-slide HDF5 files (resumable, shardable).

    \b
    Example:
      hefeat extract --encoder resnet50 --weights imagenet
      hefeat extract --encoder resnet50 --layer layer3 --weights imagenet   # 1024-d (CLAM/TRIDENT)
      hefeat extract --encoder densenet121 --tiling <tid> --tta              # ST-Net, spot tiles
      hefeat extract --encoder resnet50 --weights w.safetensors --shard 3/16
    """
    from hefeat.extract.pipeline import ExtractOptions, run_extraction

    opt = ExtractOptions(batch_size=batch_size, workers=workers, device=device, compile=compile_,
                         fail_fast=fail_fast, progress=_progress(as_json))
    kw = dict(tiling_id=tiling_id, encoder=encoder, weights=weights, layer=layer, precision=precision, tta=tta,
              dtype=dtype, seed=seed, slides=_split(slides), options=opt)
    st = _store(store_path)
    if engine == "ray":
        from hefeat.extract.ray_engine import run_extraction_ray

        s = run_extraction_ray(st, shard=shard, **kw).to_dict()
    else:
        s = run_extraction(st, shard=shard, **kw).to_dict()
    emit(s, as_json, _run_text(s, f"Extraction {s['extraction_id']} ({s.get('encoder')}, {s.get('dim')}-d)"))
    if s["failed"] and not s["ok"] and not s["already_done"]:
        sys.exit(1)


@main.group("export")
def export_group():
    """Export store data for other tools."""


@export_group.command("h5")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--extraction", "extraction_id", required=True)
@store_option
@json_option
def export_h5_cmd(outdir, extraction_id, store_path, as_json):
    """Per-slide HDF5 (features [N, D], coords [N, 2]) that CLAM/TRIDENT-style tools read.

    \b
    Example:
      hefeat export h5 --extraction e1234abcd out/features
    """
    from hefeat.extract.interop import export_h5

    s = export_h5(_store(store_path), extraction_id, outdir)
    emit(s, as_json, f"Exported {s['slides']} slides ({s['tiles']} tiles) to {s['out']}.")


@main.group("import")
def import_group():
    """Import data made by other tools."""


@import_group.command("h5")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--encoder", required=True, help="Name of the encoder that made the features.")
@click.option("--patch-size-level0", type=float, default=None, help="Tile side in level-0 px if the files lack it.")
@click.option("--allow-unmatched", is_flag=True)
@store_option
@json_option
def import_h5_cmd(folder, encoder, patch_size_level0, allow_unmatched, store_path, as_json):
    """Bring existing per-slide HDF5 features (one <slide_id>.h5 per slide) into the store.

    \b
    Example:
      hefeat import h5 clam_out/h5_files --encoder resnet50-trunc
    """
    from hefeat.extract.interop import import_h5

    s = import_h5(_store(store_path), folder, encoder=encoder, patch_size_level0=patch_size_level0,
                  allow_unmatched=allow_unmatched)
    emit(s, as_json, f"Imported {s['slides']} slides ({s['new']} new, {s['tiles']} tiles, {s['dim']}-d) as "
         f"extraction {s['extraction_id']} on tiling {s['tiling_id']}.")


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
    s = run_recipe(_store(store_path), _load_config(config_path), overrides=over)
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
    s = fit_genes(_store(store_path), p, truth=truth, force=force)
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
    s = fit_he2rna(_store(store_path), p, truth=truth, force=force)
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
    s = fit_transfer(_store(store_path), p, force=force)
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

    s = fit_spots(_store(store_path), SpotsParams(extraction_id=extraction_id, genes=genes, head=head,
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
    s = fit_traits(_store(store_path), TraitsParams(extraction_id=extraction_id, traits=list(traits),
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

    s = fit_receptors(_store(store_path), ReceptorParams(extraction_id=extraction_id, label=label, split=split,
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

    s = carto(_store(store_path), model_id, slide, out)
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

    df = hti_table(_store(store_path), model_id, out)
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

    st = _store(store_path)
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

    s = predict_model(_store(store_path), model_id, slides=_split(slides), top=top)
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

    s = report(_store(store_path), model_id, out)
    emit(s, as_json, s["headline"] + "\nPlots: " + ", ".join(s["files"]))


# ---------------------------------------------------------------------------------------------
@main.group()
def neighbors():
    """Cohort-wide nearest-neighbour search over embeddings (faiss)."""


@neighbors.command("build")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--index", "index_type", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]), default="auto", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True)
@click.option("--sample", default=100_000, show_default=True, help="Vectors used to train IVF/PQ indexes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def neighbors_build(extraction_id, index_type, metric, sample, seed, force, store_path, as_json):
    """Build a neighbour index (slide by slide) and measure its recall@10 against exact search.

    \b
    Example:
      hefeat neighbors build --extraction e1234 --index hnsw
    """
    from hefeat.explore.neighbors import build_index

    s = build_index(_store(store_path), extraction_id, index=index_type, metric=metric, sample=sample, seed=seed, force=force)
    emit(s, as_json, f"Index {s['index_id']} ({s['type']}, {s['metric']}): {s['n_vectors']} vectors, "
         f"recall@10 = {s['recall_at_10']:.3f} vs exact search{' (already built)' if s.get('cached') else ''}.")


@neighbors.command("query")
@click.option("--extraction", "extraction_id", default=None)
@click.option("--index", "index_id", default=None, help="Index id (default: the extraction's latest).")
@click.option("--tile", default=None, help="SLIDE:TILE_ID")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image file; embedded first.")
@click.option("--slide", default=None, help="Query by a slide's mean embedding.")
@click.option("-k", "k", default=20, show_default=True)
@click.option("--exclude-same-slide", is_flag=True)
@click.option("--save", is_flag=True, help="Write the result to the store (the neighbors view).")
@click.option("--physical-check", is_flag=True, help="ST-Net's latent-vs-physical neighbour check instead.")
@store_option
@json_option
def neighbors_query(extraction_id, index_id, tile, image, slide, k, exclude_same_slide, save, physical_check,
                    store_path, as_json):
    """Nearest tiles to a tile, an image or a slide, joined with slide/patient metadata.

    \b
    Example:
      hefeat neighbors query --extraction e1234 --tile S01:12 -k 20 --exclude-same-slide
    """
    from hefeat.explore.neighbors import latent_vs_physical, query

    st = _store(store_path)
    if physical_check:
        if not extraction_id:
            raise HefeatError("--physical-check needs --extraction")
        s = latent_vs_physical(st, extraction_id, index_id=index_id)
        emit(s, as_json, f"Nearest latent neighbour is a physically adjacent tile for {s['adjacent_share']:.1%} of "
             f"{s['n_queries']} tiles (same slide: {s['same_slide_share']:.1%}).")
        return
    t = None
    if tile:
        sid, _, tid = tile.rpartition(":")
        if not sid or not tid.isdigit():
            raise HefeatError(f"--tile expects SLIDE:TILE_ID, got {tile!r}")
        t = (sid, int(tid))
    res = query(st, extraction_id=extraction_id, index_id=index_id, tile=t, image=image, slide=slide, k=k,
                exclude_same_slide=exclude_same_slide, write=save)
    if as_json:
        click.echo(res.to_json(orient="records"))
    else:
        click.echo(res.to_string(index=False))


@main.command()
@click.option("--extraction", "extraction_id", required=True)
@click.option("--sample", default=100_000, show_default=True)
@click.option("--pca", default=50, show_default=True, help="PCA components first (0 = none).")
@click.option("--seed", default=0, show_default=True)
@click.option("--color", "color_sql", default=None, help="SQL returning slide_id, tile_id, color.")
@click.option("--thumbnails", default=0, show_default=True, help="Tile images at N representative points.")
@click.option("--purity-label", default=None, help="SQL returning slide_id, tile_id, label: k-means purity.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG scatter.")
@store_option
@json_option
def umap(extraction_id, sample, pca, seed, color_sql, thumbnails, purity_label, out, store_path, as_json):
    """UMAP of an extraction (coordinates stored: the umap view), PNG coloured by any SQL.

    \b
    Example:
      hefeat umap --extraction e1234 --color "SELECT slide_id, tile_id, sharpness AS color FROM tiles" --out umap.png
    """
    from hefeat.explore.umap_map import plot_umap, run_umap, umap_purity

    st = _store(store_path)
    s = run_umap(st, extraction_id, sample=sample, pca=pca or None, seed=seed)
    if out:
        s.update(plot_umap(st, s["umap_id"], out, color_sql=color_sql, thumbnails=thumbnails))
    if purity_label:
        s["purity"] = umap_purity(st, s["umap_id"], purity_label)
    text = f"UMAP {s['umap_id']}: {s['n']} tiles" + (f", plot {out}" if out else "")
    if "purity" in s:
        text += f", 2-means purity {s['purity']:.3f}"
    emit(s, as_json, text)


@main.command()
@click.option("--slide", required=True)
@click.option("--value", "value_sql", required=True, help="SQL returning tile_id and one value column.")
@click.option("--tiling", "tiling_id", default=None)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--mpp", default=4.0, show_default=True, help="Thumbnail resolution (µm/px).")
@store_option
@json_option
def heatmap(slide, value_sql, tiling_id, out, mpp, store_path, as_json):
    """Any tile-level value over the slide thumbnail, at the tiles' true positions.

    \b
    Example:
      hefeat heatmap --slide S01 --value "SELECT tile_id, sharpness FROM tiles WHERE tiling_id = 't123'" --out map.png
    """
    from hefeat.explore.heatmap import render_heatmap

    s = render_heatmap(_store(store_path), slide, value_sql, out, tiling_id=tiling_id, mpp=mpp)
    s.pop("overlay")
    emit(s, as_json, f"Heatmap of {s['column']} over {s['tiles']} tiles of {slide}: {out}")


@main.group()
def tiles():
    """Look at tiles."""


@tiles.command("show")
@click.option("--tile", required=True, help="SLIDE:TILE_ID")
@click.option("--tiling", "tiling_id", default=None)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG (default: SLIDE_TILE.png)")
@store_option
@json_option
def tiles_show(tile, tiling_id, out, store_path, as_json):
    """Write the pixels of a tile, read from its slide at the tiling's resolution.

    \b
    Example:
      hefeat tiles show --tile S01:12 --out tile.png
    """
    from PIL import Image

    from hefeat.explore.tiles import tile_image

    sid, _, tid = tile.rpartition(":")
    if not sid or not tid.isdigit():
        raise HefeatError(f"--tile expects SLIDE:TILE_ID, got {tile!r}")
    img = tile_image(_store(store_path), sid, int(tid), tiling_id=tiling_id)
    out = out or f"{sid}_{tid}.png"
    Image.fromarray(img).save(out)
    emit({"out": out, "shape": list(img.shape)}, as_json, f"Tile {tile} ({img.shape[1]}x{img.shape[0]} px) -> {out}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True)
@store_option
def explore(host, port, store_path):
    """A local web page over the store: UMAP with tile hover, neighbours on click, heatmaps.

    \b
    Example:
      hefeat explore --port 8765     # then open http://127.0.0.1:8765
    """
    from hefeat.explore.server import serve

    click.echo(f"hefeat explorer on http://{host}:{port} (Ctrl-C to stop)")
    serve(_store(store_path), host=host, port=port)


# ---------------------------------------------------------------------------------------------
@main.command()
@store_option
@json_option
def status(store_path, as_json):
    """What the store holds: slides, tilings, extractions, models, failures.

    \b
    Example:
      hefeat status --json
    """
    from hefeat.store.summary import store_status

    s = store_status(_store(store_path))
    emit(s, as_json, s.pop("text"))


@main.command()
@click.argument("query")
@click.option("--limit", default=50, show_default=True, help="Rows shown in the text output.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write all rows to .csv or .parquet.")
@store_option
@json_option
def sql(query, limit, out, store_path, as_json):
    """Run SQL over the catalog and its views (tiles, status, tilings, extractions, features_index, ...).

    \b
    Example:
      hefeat sql "SELECT slide_id, count(*) n, avg(sharpness) FROM tiles GROUP BY 1 ORDER BY 1"
    """
    import pandas as pd

    df = _store(store_path).sql(query)
    if out:
        (df.to_parquet if out.endswith(".parquet") else functools.partial(df.to_csv, index=False))(out)
    if as_json:
        click.echo(df.to_json(orient="records", date_format="iso"))
    else:
        with pd.option_context("display.max_columns", 30, "display.width", 160):
            click.echo(df.head(limit).to_string(index=False) if len(df) else "(no rows)")
        if len(df) > limit:
            click.echo(f"... {len(df)} rows in all (showing {limit}; --out to save them)")


@main.command()
@click.option("--data", default="data/demo", show_default=True, help="Where the synthetic cohort is written.")
@click.option("--slides", "n_slides", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--encoder", default=None, help="Encoder for the demo extraction (default: a truncated resnet18).")
@store_option
@json_option
def demo(data, n_slides, seed, encoder, store_path, as_json):
    """Run the whole pipeline end to end on a synthetic cohort into stores/default.

    \b
    Example:
      hefeat demo
    """
    from hefeat.demo import run_demo

    s = run_demo(data_dir=data, store=store_path, n_slides=n_slides, seed=seed, encoder=encoder,
                 echo=None if as_json else click.echo)
    emit(s, as_json, s.pop("text", "Demo done."))


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=Path(sys.argv[0]).name)
