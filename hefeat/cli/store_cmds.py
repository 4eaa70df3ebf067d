"""Store commands: init, ingest, status, sql."""

from __future__ import annotations

import functools
import sys

import click

from hefeat.cli.common import (
    emit,
    get_store,
    json_option,
    main,
    progress_enabled,
    store_option,
)


@main.command()
@store_option
@json_option
def init(store_path, as_json):
    """Create a store (DuckDB catalog + folders); safe to repeat.

    \b
    Example:
      hefeat init --store stores/brca
    """
    st = get_store(store_path, create=True)
    emit({"store": str(st.root)}, as_json, f"Store ready at {st.root}.")


# ---------------------------------------------------------------------------------------------
@main.group()
def ingest():
    """Bring slides, expression, clinical data or spots into the store."""


@ingest.command("slides")
@click.argument("paths", nargs=-1, required=True)
@click.option("--mpp", type=float, default=None,
              help="Level-0 µm/px for slides that state none (one that states another needs --override-mpp).")
@click.option("--override-mpp", is_flag=True,
              help="Use --mpp (or the manifest's mpp) even where a slide states another value (recorded).")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="CSV with path or slide_id, and optional patient_id, site, mpp.")
@click.option("--gdc-manifest", type=click.Path(dir_okay=False), default=None,
              help="gdc-client manifest (id, filename, md5, size, state): every listed file must be there.")
@click.option("--verify-md5", is_flag=True, help="Check each file against the GDC manifest's md5.")
@click.option("--sample-sheet", type=click.Path(dir_okay=False), default=None,
              help="GDC sample sheet of the slide files: patient from Case ID (checked against the barcode).")
@click.option("--diagnostic-only", is_flag=True, help="TCGA: keep diagnostic FFPE slides (DX) only, not frozen TS/BS.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first bad slide.")
@click.option("--replace", is_flag=True,
              help="Apply a new --mpp to slides that already have tiles (their tiles and features are redone).")
@store_option
@json_option
def ingest_slides_cmd(paths, mpp, override_mpp, manifest, gdc_manifest, verify_md5, sample_sheet, diagnostic_only,
                      fail_fast, replace, store_path, as_json):
    """Register slide files or folders of them (any format OpenSlide reads).

    TCGA barcodes in file names (TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs) give slide, patient and site.

    \b
    Example:
      hefeat ingest slides data/demo/slides/*.tiff
      hefeat ingest slides CMU-1-Small-Region.svs --mpp 0.499
      hefeat ingest slides CMU-1-Small-Region.svs --mpp 0.5 --override-mpp --replace   # correct it later
      hefeat ingest slides gdc_download/ --gdc-manifest gdc_manifest.txt --verify-md5
    """
    from hefeat.slides.run import ingest_slides

    rep = ingest_slides(get_store(store_path), list(paths), mpp=mpp, manifest=manifest, gdc_manifest=gdc_manifest,
                        verify_md5=verify_md5, sample_sheet=sample_sheet, diagnostic_only=diagnostic_only,
                        fail_fast=fail_fast, replace=replace, override_mpp=override_mpp,
                        progress=progress_enabled(as_json))
    d = rep.to_dict()
    text = (f"Ingested {d['added']} slides ({len(rep.updated)} updated, {d['unchanged']} already there, "
            f"{len(d['failed'])} failed).")
    for n in rep.notes:
        text += f"\n  {n}"
    for u in rep.updated[:10]:
        text += f"\n  updated {u}"
    for p, why in list(rep.failed.items())[:10]:
        text += f"\n  failed {p}: {why}"
    emit(d, as_json, text)
    if rep.failed and not rep.added and not rep.unchanged:
        sys.exit(1)


def _table_ingest(kind: str):
    def cmd(path, store_path, as_json, allow_unmatched, **kw):
        from hefeat.store import ingest as ing

        fn = {"expression": ing.ingest_expression_source, "clinical": ing.ingest_clinical_source,
              "spots": ing.ingest_spots}[kind]
        rep = fn(get_store(store_path), path, allow_unmatched=allow_unmatched, **kw)
        d = rep.to_dict()
        note = f" {len(rep.unmatched)} ids matched no slide: {', '.join(rep.unmatched[:8])}." if rep.unmatched else ""
        state = "unchanged (the store already holds this content)" if rep.unchanged else f"{d['rows']} values"
        notes = "".join(f"\n  {n}" for n in rep.notes)
        emit(d, as_json, f"Ingested {kind} from {path}: {state}.{note}{notes}")

    return cmd


def _types(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


@ingest.command("expression")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "gdc", "xena", "cbioportal"]), default="auto",
              show_default=True, help="auto: a folder is a GDC STAR-Counts download; Hugo_Symbol/Entrez_Gene_Id is "
              "cBioPortal; else a table. Xena matrices (log2 values) need --format xena.")
@click.option("--dataset", default="expression", show_default=True, help="Name of this target table.")
@click.option("--sample-col", default=None, help="Sample id column of a wide table (default: first column).")
@click.option("--sample-sheet", type=click.Path(dir_okay=False), default=None,
              help="GDC sample sheet of a STAR-Counts folder (default: the gdc_sample_sheet*.tsv next to it).")
@click.option("--value", default="tpm_unstranded", show_default=True,
              help="GDC STAR-Counts column: tpm_unstranded, unstranded, fpkm_unstranded, fpkm_uq_unstranded, ...")
@click.option("--gene-ids", type=click.Choice(["symbol", "ensembl"]), default="symbol", show_default=True,
              help="GDC: genes by gene_name (duplicates resolved, reported) or by Ensembl id (version stripped).")
@click.option("--pseudocount", type=float, default=1.0, show_default=True, help="Xena: values are log2(x + this).")
@click.option("--sample-types", default=None, help="TCGA: sample types matched (default 01, primary tumour; 11 = solid tissue normal).")
@click.option("--slide-types", default=None, help="TCGA: slide types matched (default DX; TS/BS/MS = frozen).")
@click.option("--allow-unmatched", is_flag=True, help="Keep samples that match no slide (reported).")
@store_option
@json_option
def ingest_expression_cmd(path, fmt, dataset, sample_col, sample_sheet, value, gene_ids, pseudocount, sample_types,
                          slide_types, allow_unmatched, store_path, as_json):
    """Ingest bulk expression: a table (wide or long), a GDC STAR-Counts folder, a Xena or cBioPortal matrix.

    TCGA sample barcodes are matched to slides of the same sample (primary tumour 01 and diagnostic
    slides by default; normals and frozen slides are reported, not matched).

    \b
    Example:
      hefeat ingest expression data/demo/expression.parquet
      hefeat ingest expression gdc_rna/ --sample-sheet gdc_sample_sheet.tsv --value tpm_unstranded
      hefeat ingest expression TCGA-BRCA.star_tpm.tsv --format xena
      hefeat ingest expression brca_tcga/data_mrna_seq_v2_rsem.txt
    """
    _table_ingest("expression")(path, store_path, as_json, allow_unmatched, fmt=fmt, dataset=dataset,
                                sample_col=sample_col, sample_sheet=sample_sheet, value=value, gene_ids=gene_ids,
                                pseudocount=pseudocount, sample_types=_types(sample_types),
                                slide_types=_types(slide_types))


@ingest.command("clinical")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "cbioportal", "gdc"]), default="auto",
              show_default=True, help="auto: '#' header rows / PATIENT_ID = cBioPortal; case_submitter_id = GDC.")
@click.option("--samples", type=click.Path(dir_okay=False), default=None,
              help="cBioPortal data_clinical_sample.txt next to the patient file.")
@click.option("--sample-types", default=None, help="TCGA: sample types whose slides get rows (default 01).")
@click.option("--slide-types", default=None, help="TCGA: slide types that get rows (default DX).")
@click.option("--allow-unmatched", is_flag=True)
@store_option
@json_option
def ingest_clinical_cmd(path, fmt, samples, sample_types, slide_types, allow_unmatched, store_path, as_json):
    """Ingest clinical data: a table keyed by slide_id or patient_id, cBioPortal files or the GDC clinical TSV.

    Survival becomes survival_months + event; TCGA receptor columns become er_status / pr_status /
    her2_status (1/0; Equivocal, Indeterminate, [Not Evaluated], [Not Available] missing, counted).

    \b
    Example:
      hefeat ingest clinical data/demo/clinical.csv
      hefeat ingest clinical data_clinical_patient.txt --samples data_clinical_sample.txt
      hefeat ingest clinical clinical.tsv            # GDC
    """
    _table_ingest("clinical")(path, store_path, as_json, allow_unmatched, fmt=fmt, samples=samples,
                              sample_types=_types(sample_types), slide_types=_types(slide_types))


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



def _spatial_text(rep) -> str:
    d = rep.to_dict()
    return (f"Ingested {len(rep.added) + len(rep.updated)} spatial sections ({d['unchanged']} slides already there), "
            f"{rep.rows} spots." + "".join(f"\n  {n}" for n in rep.notes))


@ingest.command("visium")
@click.argument("outs", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The full-resolution H&E given to Space Ranger (default: the one image next to outs/).")
@click.option("--slide-id", default=None, help="Slide id (default: the folder holding outs/).")
@click.option("--patient-id", default=None, help="Patient id (default: the slide id).")
@click.option("--mpp", type=float, default=None,
              help="µm/px of the image (default: what it states, else 55 µm / spot_diameter_fullres).")
@click.option("--override-mpp", is_flag=True,
              help="Use --mpp (or the data's spot geometry) even where the image states another µm/px (recorded).")
@click.option("--replace", is_flag=True, help="Apply a new µm/px to a slide that already has tiles.")
@store_option
@json_option
def ingest_visium_cmd(outs, image, slide_id, patient_id, mpp, override_mpp, replace, store_path, as_json):
    """Ingest a 10x Visium Space Ranger outs/ folder: the H&E as a slide, spots in its pixels, counts.

    \b
    Example:
      hefeat ingest visium sample1/outs --image sample1/he_fullres.tif
    """
    from hefeat.slides.spatial import ingest_visium

    rep = ingest_visium(get_store(store_path), outs, image=image, slide_id=slide_id, patient_id=patient_id, mpp=mpp,
                        override_mpp=override_mpp, replace=replace)
    emit(rep.to_dict(), as_json, _spatial_text(rep))


@ingest.command("hest")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--sample", "samples", multiple=True, help="Sample id (repeat; default: every st/*.h5ad).")
@click.option("--override-mpp", is_flag=True,
              help="Use the metadata's pixel size even where the WSI states another µm/px (recorded).")
@click.option("--replace", is_flag=True, help="Apply a new µm/px to slides that already have tiles.")
@store_option
@json_option
def ingest_hest_cmd(root, samples, override_mpp, replace, store_path, as_json):
    """Ingest HEST-1k samples: wsis/<id>.tif, st/<id>.h5ad (obsm['spatial']), metadata/<id>.json.

    \b
    Example:
      hefeat ingest hest hest_data --sample TENX95 --sample TENX99
    """
    from hefeat.slides.spatial import ingest_hest

    rep = ingest_hest(get_store(store_path), root, list(samples) or None, override_mpp=override_mpp, replace=replace)
    emit(rep.to_dict(), as_json, _spatial_text(rep))


@ingest.command("st")
@click.argument("counts", type=click.Path(exists=True, dir_okay=False))
@click.option("--spots", "spot_table", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Spot detector table (x, y, new_x, new_y, pixel_x, pixel_y, selected).")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="The section's H&E.")
@click.option("--slide-id", default=None, help="Slide id (default: the image's file stem).")
@click.option("--patient-id", default=None, help="Patient id (default: the slide id).")
@click.option("--mpp", type=float, default=None,
              help="µm/px of the image (default: what it states, else from the 200 µm spot pitch).")
@click.option("--override-mpp", is_flag=True,
              help="Use --mpp (or the data's spot geometry) even where the image states another µm/px (recorded).")
@click.option("--replace", is_flag=True, help="Apply a new µm/px to a slide that already has tiles.")
@store_option
@json_option
def ingest_st_cmd(counts, spot_table, image, slide_id, patient_id, mpp, override_mpp, replace, store_path, as_json):
    """Ingest an original-format ST section (ST-Net's data): counts with XxY spot ids, spot table, H&E.

    \b
    Example:
      hefeat ingest st BC23209_C1_stdata.tsv --spots spots_BC23209_C1.tsv --image HE_BC23209_C1.jpg
    """
    from hefeat.slides.spatial import ingest_st

    rep = ingest_st(get_store(store_path), counts, spot_table, image, mpp=mpp, slide_id=slide_id,
                    patient_id=patient_id, override_mpp=override_mpp, replace=replace)
    emit(rep.to_dict(), as_json, _spatial_text(rep))


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

    s = store_status(get_store(store_path))
    emit(s, as_json, s.pop("text"))


@main.command()
@store_option
@json_option
def compact(store_path, as_json):
    """Compact records and per-slide files and consolidate slide aggregates (the writers do it as they finish).

    \b
    Example:
      hefeat compact
    """
    from hefeat.store.features import compact_store

    s = compact_store(get_store(store_path))
    emit(s, as_json, f"Compacted {s['records']} commit records and {s['files']} per-slide files "
                     f"of {len(s['families'])} families in {s['seconds']:.1f} s.")


@main.command()
@click.argument("query")
@click.option("--limit", default=50, show_default=True, help="Rows shown in the text output.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write all rows to .csv or .parquet.")
@click.option("--tiling", "tiling_id", default=None, help="Let `tiles` hold this tiling's tiles only.")
@store_option
@json_option
def sql(query, limit, out, tiling_id, store_path, as_json):
    """Run read-only SQL over the catalog and its views (tiles, status, tilings, extractions, features_index, ...).

    Only reads run (SELECT, DESCRIBE, SUMMARIZE, EXPLAIN); COPY, ATTACH, INSTALL, SET and writes are refused.

    \b
    Example:
      hefeat sql "SELECT slide_id, count(*) n, avg(sharpness) FROM tiles GROUP BY 1 ORDER BY 1" --tiling t1a2b3c
    """
    import pandas as pd

    df = get_store(store_path).sql(query, tiling=tiling_id)
    if out:
        (df.to_parquet if out.endswith(".parquet") else functools.partial(df.to_csv, index=False))(out)
    if as_json:
        click.echo(df.to_json(orient="records", date_format="iso"))
    else:
        with pd.option_context("display.max_columns", 30, "display.width", 160):
            click.echo(df.head(limit).to_string(index=False) if len(df) else "(no rows)")
        if len(df) > limit:
            click.echo(f"... {len(df)} rows in all (showing {limit}; --out to save them)")

