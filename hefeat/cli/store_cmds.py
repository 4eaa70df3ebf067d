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
@click.option("--mpp", type=float, default=None, help="Level-0 µm/px for slides that state none.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="CSV with path or slide_id, and optional patient_id, site, mpp.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first bad slide.")
@click.option("--replace", is_flag=True,
              help="Apply a new --mpp to slides that already have tiles (their tiles and features are redone).")
@store_option
@json_option
def ingest_slides_cmd(paths, mpp, manifest, fail_fast, replace, store_path, as_json):
    """Register slide files (any format OpenSlide reads).

    \b
    Example:
      hefeat ingest slides data/demo/slides/*.tiff
      hefeat ingest slides CMU-1-Small-Region.svs --mpp 0.499
      hefeat ingest slides CMU-1-Small-Region.svs --mpp 0.5 --replace   # correct it later
    """
    from hefeat.slides.run import ingest_slides

    rep = ingest_slides(get_store(store_path), list(paths), mpp=mpp, manifest=manifest, fail_fast=fail_fast,
                        replace=replace, progress=progress_enabled(as_json))
    d = rep.to_dict()
    text = (f"Ingested {d['added']} slides ({len(rep.updated)} updated, {d['unchanged']} already there, "
            f"{len(d['failed'])} failed).")
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

        fn = {"expression": ing.ingest_expression, "clinical": ing.ingest_clinical, "spots": ing.ingest_spots}[kind]
        rep = fn(get_store(store_path), path, allow_unmatched=allow_unmatched, **kw)
        d = rep.to_dict()
        note = f" {len(rep.unmatched)} ids matched no slide: {', '.join(rep.unmatched[:8])}." if rep.unmatched else ""
        state = "unchanged (the store already holds this content)" if rep.unchanged else f"{d['rows']} values"
        notes = "".join(f" {n}." for n in rep.notes)
        emit(d, as_json, f"Ingested {kind} from {path}: {state}.{note}{notes}")

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
    """Compact the store's per-slide files for fast queries (also happens on its own as needed).

    \b
    Example:
      hefeat compact
    """
    s = get_store(store_path).compact()
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

