"""Stage-1 commands: synth, tile, extract, export/import of HDF5."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hefeat.cli.common import (
    emit,
    get_store,
    json_option,
    main,
    progress_enabled,
    quiet_gc,
    run_text,
    split_ids,
    store_option,
)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slides", "n_slides", default=24, show_default=True, help="Number of slides.")
@click.option("--genes", "n_genes", default=200, show_default=True, help="Number of genes.")
@click.option("--signal-share", default=0.3, show_default=True, help="Share of genes driven by tissue composition.")
@click.option("--seed", default=0, show_default=True)
@click.option("--width-um", default=1600.0, show_default=True)
@click.option("--height-um", default=1200.0, show_default=True)
@click.option("--layout", type=click.Choice(["hefeat", "tcga", "visium", "hest", "st"]), default="hefeat",
              show_default=True, help="Also write the cohort as a published download: tcga (GDC slides, STAR-Counts, "
              "cBioPortal, Xena), visium (Space Ranger outs/), hest (HEST-1k samples) or st (original ST format).")
@json_option
def synth(out, n_slides, n_genes, signal_share, seed, width_um, height_um, layout, as_json):
    """Write a synthetic H&E cohort with known ground truth.

    \b
    Example:
      hefeat synth data/demo --slides 24 --seed 0
      hefeat synth data/tcga --slides 16 --layout tcga      # data/tcga/tcga/: a TCGA download
      hefeat synth data/vis --slides 4 --layout visium      # data/vis/visium/<slide>/outs/
    """
    from hefeat.formats.synth_layouts import write_layout
    from hefeat.slides.synth import make_cohort

    spot = {"spot_diameter_um": 55.0} if layout in ("visium", "hest") else {}
    s = make_cohort(out, n_slides=n_slides, n_genes=n_genes, signal_share=signal_share, seed=seed,
                    width_um=width_um, height_um=height_um, progress=progress_enabled(as_json), **spot)
    text = (f"Wrote {s['slides']} slides ({s['patients']} patients), {s['genes']} genes "
            f"({s['signal_genes']} signal), {s['spots']} spots and truth.json to {s['out']}.")
    if layout != "hefeat":
        s["layout"] = write_layout(layout, out, seed=seed)
        text += f"\n{s['layout']['text']}"
    emit(s, as_json, text)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Target µm/px of the tiles.")
@click.option("--size", type=int, default=None,
              help="Tile side in pixels at --mpp (default 224; with --spots: the recorded spot diameter, e.g. 55 µm).")
@click.option("--stride", type=int, default=None, help="Grid step in pixels at --mpp (default: --size).")
@click.option("--tissue-threshold", type=float, default=None, help="Minimum Otsu tissue share per tile (default 0.5).")
@click.option("--background", type=click.Choice(["otsu", "mean-rgb", "density"]), default=None,
              help="Tile rule: otsu tissue share; mean-rgb (HE2RNA/PathoMCH); density top-N (Ektefaie).")
@click.option("--max-background", type=float, default=None, help="mean-rgb rule: largest background share kept.")
@click.option("--top-n", type=int, default=None, help="density rule: tiles kept per slide (default 200).")
@click.option("--max-tiles", type=int, default=None, help="Random sample of at most N tiles per slide.")
@click.option("--seed", type=int, default=None, help="Seed of the --max-tiles sample (recorded).")
@click.option("--spots", is_flag=True, help="Spot-centred patches for slides that have spots.")
@click.option("--min-object-um2", type=float, default=None,
              help="Tissue pieces smaller than this are dropped (default 20,000 µm²; capped at 10 % of the image).")
@click.option("--max-hole-um2", type=float, default=None, help="Holes in tissue smaller than this are filled (default 20,000 µm²).")
@click.option("--mask-mpp", type=float, default=None, help="µm/px of the tissue-detection thumbnail (default 8; finer for small images).")
@click.option("--no-mask", is_flag=True, help="No tissue detection: every grid tile is kept (ROIs, all-tissue images).")
@click.option("--allow-upsample", is_flag=True,
              help="Tile finer than a slide's level 0 (by > 10 %) anyway; refused otherwise (recorded per slide).")
@click.option("--manifest", "overrides", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV/TSV/Parquet with slide_id and per-slide tissue_threshold, min_object_um2, max_hole_um2, mask, mask_mpp.")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: all).")
@click.option("--shard", default=None, help="I/N: this process tiles its share of the slides.")
@click.option("--qc-thumbnails", is_flag=True, help="Write reports/qc-<tiling>/<slide>.png: mask outline and tiles.")
@click.option("--fail-fast", is_flag=True)
@store_option
@json_option
def tile(mpp, size, stride, tissue_threshold, background, max_background, top_n, max_tiles, seed, spots,
         min_object_um2, max_hole_um2, mask_mpp, no_mask, allow_upsample, overrides, slides, shard, qc_thumbnails,
         fail_fast, store_path, as_json):
    """Tile every slide at a physical resolution, with QC columns per tile.

    \b
    Example:
      hefeat tile --mpp 0.5 --size 224
      hefeat tile --mpp 0.5 --size 224 --spots
      hefeat tile --background density --top-n 200      # Ektefaie et al.
      hefeat tile --mpp 0.5 --size 224 --no-mask         # an ROI that is all tissue
      hefeat tile --mpp 0.5 --size 224 --manifest per_slide.csv --qc-thumbnails
    """
    from hefeat.slides.run import run_tiling
    from hefeat.slides.tiling import TilingParams, read_overrides

    given = {"mpp": mpp, "size": size, "stride": stride, "tissue_threshold": tissue_threshold,
             "background": background, "max_background": max_background, "top_n": top_n,
             "max_tiles": max_tiles, "seed": seed, "spots": spots, "min_object_um2": min_object_um2,
             "max_hole_um2": max_hole_um2, "mask_mpp": mask_mpp, "mask": False if no_mask else None,
             "upsample": True if allow_upsample else None, "overrides": read_overrides(overrides) if overrides else None}
    st = get_store(store_path)
    if spots and size is None:  # spot patches default to the data's spot diameter
        from hefeat.slides.spatial import spot_patch_px

        given["size"] = spot_patch_px(st, mpp, split_ids(slides))
    params = TilingParams(**{k: v for k, v in given.items() if v is not None})
    s = run_tiling(st, params, slides=split_ids(slides), shard=shard, fail_fast=fail_fast,
                   progress=progress_enabled(as_json), qc_thumbnails=qc_thumbnails).to_dict()
    if qc_thumbnails and s["already_done"]:  # slides tiled before: draw their pictures now
        from hefeat.slides.qc_thumbnail import write_tiling_qc

        s["qc_thumbnails"] = len(write_tiling_qc(st, s["tiling_id"], split_ids(slides))["written"])
    emit(s, as_json, run_text(s, f"Tiling {s['tiling_id']}") + f"\nQuery them: hefeat sql \"SELECT * FROM tiles WHERE tiling_id = '{s['tiling_id']}'\"")
    if s["exit_code"]:  # every slide failed or was busy
        sys.exit(s["exit_code"])



@main.command()
@click.option("--tiling", "tiling_id", required=True, help="Tiling id (hefeat status lists them).")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: every tiled slide).")
@store_option
@json_option
def qc(tiling_id, slides, store_path, as_json):
    """Draw QC pictures (thumbnail, tissue mask outline, kept tiles) for an existing tiling.

    \b
    Example:
      hefeat qc --tiling t1234abcd
    """
    from hefeat.slides.qc_thumbnail import write_tiling_qc

    s = write_tiling_qc(get_store(store_path), tiling_id, split_ids(slides))
    emit(s, as_json, f"Wrote {len(s['written'])} QC pictures" + (f" to {Path(s['written'][0]).parent}" if s["written"] else "")
         + (f"; failed: {s['failed']}" if s["failed"] else ""))
    if s["failed"] and not s["written"]:
        sys.exit(1)


@main.command()
@store_option
@json_option
def encoders(store_path, as_json):
    """List the named encoders (pathology presets): dim, input, µm/px, pooling, weights, licence.

    \b
    Example:
      hefeat encoders
      hefeat extract --encoder uni --weights path/to/pytorch_model.bin
    """
    from hefeat.extract.encoders import describe_encoders

    rows = describe_encoders()
    emit({"encoders": rows}, as_json, "\n".join(
        f"{r['name']:<20} {r['dim']:>5}-d  {r['input_px']} px at {r['mpp'] or '-'} µm/px  {r['pooling']:<9} "
        f"{'gated ' if r['gated'] else ''}{r['weights']}  [{r['licence']}]" for r in rows))


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--encoder", default="resnet50", show_default=True,
              help="A preset (hefeat encoders: uni, virchow2, ...), a timm model name or hf-hub:ORG/NAME.")
@click.option("--weights", default=None,
              help="imagenet / hub / bundled (defaults per encoder), none (random, seeded: a warning) or a weights file.")
@click.option("--layer", default=None, help="Truncate at this stage, then global-average-pool (e.g. layer3).")
@click.option("--tiling", "tiling_id", default=None, help="Tiling id (default: the store's only tissue tiling).")
@click.option("--tile", "tile_spec", default=None,
              help="Tile too, with these `hefeat tile` settings (e.g. mpp=0.5,size=224): slides not tiled yet are "
                   "tiled and embedded from one read of each tile (decode once).")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: all tiled slides).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: the fastest numerically sound precision, measured once per extraction by its first worker on a "
                   "seeded sample of the cohort and recorded in the store (every shard and node then uses it); auto also "
                   "folds BatchNorms into their convolutions (recorded with it). A fixed precision runs the network as built.")
@click.option("--batch-size", type=int, default=None, help="Tiles per batch (default 64; on GPUs with auto: measured).")
@click.option("--fit", type=click.Choice(["auto", "identity", "crop", "resize", "native"]), default="auto", show_default=True,
              help="How tiles become the encoder's input size; auto refuses resizes that change µm/px by > 10 %.")
@click.option("--workers", type=int, default=None,
              help="DataLoader worker processes reading tiles (default: none on the CPU, where the main process reads "
                   "between forwards; available CPUs - 1 on a GPU). On slow (network) storage, workers read ahead.")
@click.option("--shard", default=None, help="I/N: this process embeds its share of the slides (SLURM arrays).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--tta", is_flag=True, help="Average over the 8 rotations/reflections (ST-Net).")
@click.option("--stain-norm", type=click.Choice(["macenko", "reinhard"]), default=None,
              help="Stain-normalise every tile on the device (part of the extraction id).")
@click.option("--stain-reference", default=None,
              help="Image file to normalise towards (default: a seeded sample of 64 tiles from the cohort).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for --weights none.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--fail-fast", is_flag=True)
@store_option
@json_option
def extract(encoder, weights, layer, tiling_id, tile_spec, slides, precision, batch_size, fit, workers, shard, engine, tta,
            stain_norm, stain_reference, compile_, dtype, seed, device, fail_fast, store_path, as_json):
    """Embed every tile of a tiling into per-slide HDF5 files (resumable, shardable).

    \b
    Example:
      hefeat extract --encoder resnet50 --weights imagenet
      hefeat extract --encoder resnet50 --layer layer3 --weights imagenet   # 1024-d (CLAM/TRIDENT)
      hefeat extract --encoder densenet121 --tiling <tid> --tta              # ST-Net, spot tiles
      hefeat extract --encoder resnet50 --weights w.safetensors --shard 3/16
      hefeat extract --encoder uni --weights uni.bin --stain-norm macenko --stain-reference ref.png
      hefeat extract --tile mpp=0.5,size=224 --encoder resnet50 --weights imagenet   # tile + embed, one read
    """
    with quiet_gc():  # torch and timm import with the collector paused (see quiet_gc)
        from hefeat.extract.pipeline import ExtractOptions, import_runtime, run_extraction
        from hefeat.slides.tiling import TilingParams

        import_runtime(will_compile=compile_)
    opt = ExtractOptions(batch_size=batch_size, workers=workers, device=device, compile=compile_,
                         fail_fast=fail_fast, progress=progress_enabled(as_json))
    kw = dict(tiling_id=tiling_id, encoder=encoder, weights=weights, layer=layer, precision=precision, tta=tta,
              dtype=dtype, seed=seed, slides=split_ids(slides), fit=fit, stain=stain_norm,
              stain_reference=stain_reference, options=opt)
    st = get_store(store_path)
    tile_params = TilingParams.from_spec(tile_spec) if tile_spec else None
    if engine == "ray":
        from hefeat.extract.ray_engine import run_extraction_ray

        s = run_extraction_ray(st, shard=shard, tile_params=tile_params, **kw).to_dict()
    else:
        s = run_extraction(st, shard=shard, tile_params=tile_params, **kw).to_dict()
    text = run_text(s, f"Extraction {s['extraction_id']} ({s.get('encoder')}, {s.get('dim')}-d)")
    if s.get("decode_once"):
        d = s["decode_once"]
        text += (f"\nDecode once: {d.get('tiles_read_once', 0)} tiles read once (QC + embedding), "
                 f"{d.get('tiles_read_twice', 0)} read again after tiling; ~{d.get('read_s_saved_est', 0)} s of reads saved"
                 if d["used"] else f"\nDecode once not used: {d['why']}")
    if s.get("read_note"):
        text += f"\nNote: {s['read_note']}"
    emit(s, as_json, text)
    if s["exit_code"]:  # every slide failed or was busy
        sys.exit(s["exit_code"])


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

    s = export_h5(get_store(store_path), extraction_id, outdir)
    emit(s, as_json, f"Exported {s['slides']} slides ({s['tiles']} tiles) to {s['out']}.")


@export_group.command("anndata")
@click.argument("out", type=click.Path())
@click.option("--extraction", "extraction_id", required=True)
@click.option("--per-slide", is_flag=True, help="One <slide_id>.h5ad per slide in the folder OUT (default: one file).")
@click.option("--slides", default=None, help="Comma-separated slide ids (default: every finished slide).")
@store_option
@json_option
def export_anndata_cmd(out, extraction_id, per_slide, slides, store_path, as_json):
    """AnnData (.h5ad) for scanpy/squidpy: tiles x features, obs = tile QC + slide/patient/site,
    obsm['spatial'] (level-0 px) and obsm['spatial_um'] (µm) at tile centres.

    \b
    Example:
      hefeat export anndata tiles.h5ad --extraction e1234abcd
      hefeat export anndata out/ --extraction e1234abcd --per-slide
    """
    from hefeat.extract.anndata_export import export_anndata

    s = export_anndata(get_store(store_path), extraction_id, out, per_slide=per_slide, slides=split_ids(slides))
    emit(s, as_json, f"Exported {s['tiles']} tiles of {s['slides']} slides to {', '.join(s['files'][:3])}"
         f"{' …' if len(s['files']) > 3 else ''}.")


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

    s = import_h5(get_store(store_path), folder, encoder=encoder, patch_size_level0=patch_size_level0,
                  allow_unmatched=allow_unmatched)
    emit(s, as_json, f"Imported {s['slides']} slides ({s['new']} new, {s['tiles']} tiles, {s['dim']}-d) as "
         f"extraction {s['extraction_id']} on tiling {s['tiling_id']}.")


