"""Stage-2 commands: fit (one subcommand per registered method), run (recipes), predict, report,
cartography, hti, survival. Every method's options, text and dispatch come from the registry."""

from __future__ import annotations

import dataclasses
import typing

import click

from hefeat.cli.common import (
    emit,
    get_store,
    json_option,
    main,
    progress_enabled,
    split_ids,
    store_option,
)

SET_HELP = "Override a recipe value: section.key=value (YAML), e.g. encoder.name=resnet18 or params.seed=3; repeat."


# ---------------------------------------------------------------------------------------------
# fit <method>: generated from the registry
# ---------------------------------------------------------------------------------------------
def _option(f: dataclasses.Field, tp) -> click.Option:
    """A click option for one Params field; unset options stay None so the dataclass default applies."""
    from hefeat.learn.registry import is_optional

    meta = f.metadata
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else f.default
    _, base = is_optional(tp)
    help_ = meta.get("help", "")
    if base is bool and not required:
        help_ += f"  [default: {'on' if default else 'off'}]"
    elif default is not None:
        shown = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default) if isinstance(default, tuple) \
            else default
        help_ += f"  [default: {shown}]"
    kw: dict = {"help": help_, "required": required, "default": None}
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", f.name], **kw, show_default=False) if not required else \
            click.Option([flag, f.name], is_flag=True, help=help_)
    if meta.get("choices"):
        kw["type"] = click.Choice([str(c) for c in meta["choices"]])
    elif base in (int, float) and not meta.get("parse"):
        kw["type"] = base
    if meta.get("multiple"):
        kw["multiple"] = True
        kw["default"] = ()
    return click.Option([flag, f.name], **kw)


def fit_command(method) -> click.Command:
    """The `hefeat fit <name>` command of a registered method, its options from the Params fields."""
    hints = typing.get_type_hints(method.params)
    params = [_option(f, hints[f.name]) for f in dataclasses.fields(method.params) if f.metadata.get("cli", True)]
    names = {f.name for f in dataclasses.fields(method.params)}
    params.append(click.Option(["--force"], is_flag=True, help="Refit even if this exact model exists."))
    if method.truth:
        params.append(click.Option(["--truth"], type=click.Path(exists=True, dir_okay=False), default=None,
                                   help="A synthetic cohort's truth.json: score the gene calls against it."))

    def callback(store_path, as_json, force=False, truth=None, **kw):
        from hefeat.learn.registry import fit_model, fit_text, make_params

        values = {k: v for k, v in kw.items() if k in names and v is not None and v != ()}
        p = make_params(method.params, values)
        s = fit_model(get_store(store_path), method, p, force=force, truth=truth)
        emit(s, as_json, fit_text(s))

    doc = f"{method.summary}\n\n\b\nExample:\n  {method.example or 'hefeat fit ' + method.name + ' --help'}"
    cmd = click.Command(method.name, callback=callback, params=params, help=doc, short_help=method.summary)
    return _with_common(cmd)


def _with_common(cmd: click.Command) -> click.Command:
    cmd.params.append(click.Option(["--store", "store_path"], default=None, envvar="HEFEAT_STORE",
                                   help="Store directory (default: $HEFEAT_STORE or stores/default)."))
    cmd.params.append(click.Option(["--json", "as_json"], is_flag=True, help="Print the summary as one JSON object."))
    return cmd


class FitGroup(click.Group):
    """`hefeat fit`: one subcommand per registered method, looked up when used."""

    def list_commands(self, ctx) -> list[str]:
        from hefeat.learn.registry import fittable

        return sorted(fittable())

    def get_command(self, ctx, name: str):
        from hefeat.learn.registry import fittable

        m = fittable().get(name)
        return fit_command(m) if m else None


@main.group(cls=FitGroup, invoke_without_command=True)
@click.option("--config", "config_path", default=None, help="A recipe: a packaged name (emo, he2rna, ...) or a YAML file.")
@click.option("--extraction", "extraction_id", default=None, help="With --config: fit this extraction (checked against the recipe).")
@click.option("--set", "sets", multiple=True, help=SET_HELP)
@click.option("--truth", default=None, help="With --config: a synthetic cohort's truth.json.")
@click.option("--force", is_flag=True, help="With --config: refit even if this exact model exists.")
@store_option
@json_option
@click.pass_context
def fit(ctx, config_path, extraction_id, sets, truth, force, store_path, as_json):
    """Fit a model from the store: one subcommand per method, or a recipe with --config.

    \b
    Example:
      hefeat fit genes --extraction e1234 --split patient-kfold:5
      hefeat fit --config emo --extraction e1234
    """
    if ctx.invoked_subcommand is not None:
        return
    if not config_path:
        click.echo(ctx.get_help())
        return
    _run(config_path, sets, extraction_id, truth, force, store_path, as_json)


def _run(ref, sets, extraction_id, truth, force, store_path, as_json):
    from hefeat.learn.recipes import load_recipe, run_recipe
    from hefeat.learn.registry import fit_text

    recipe = load_recipe(ref, list(sets))
    s = run_recipe(get_store(store_path), recipe, extraction_id=extraction_id, truth=truth, force=force,
                   progress=progress_enabled(as_json))
    r = s["recipe"]
    how = (f"Recipe {r['recipe']}: extraction {r.get('extraction_id')}" +
           (f" (tiling {r['tiling_id']}: {r['tiled']['new']} slides tiled, {r['tiled']['reused']} reused; "
            f"{r['extracted']['new']} extracted, {r['extracted']['reused']} reused)" if "tiling_id" in r else "")
           + (f"; overrides: {', '.join(r['overrides'])}" if r["overrides"] else ""))
    emit(s, as_json, how + "\n" + fit_text(s))


@main.command("run")
@click.argument("recipe")
@click.option("--set", "sets", multiple=True, help=SET_HELP)
@click.option("--extraction", "extraction_id", default=None, help="Fit this extraction instead (must match the recipe).")
@click.option("--truth", default=None, help="A synthetic cohort's truth.json (gene-level methods).")
@click.option("--force", is_flag=True, help="Refit even if this exact model exists.")
@store_option
@json_option
def run_cmd(recipe, sets, extraction_id, truth, force, store_path, as_json):
    """Run a paper end to end from a recipe: tile at its resolution, extract with its encoder, fit.

    Work already in the store (same tiling, same extraction, same model) is reused. RECIPE is a
    packaged recipe name (see configs/: demo, emo, he2rna, receptors, stnet, traits, transfer) or a
    YAML file.

    \b
    Example:
      hefeat run emo
      hefeat run he2rna --set encoder.name=resnet18 --set encoder.weights=none
    """
    _run(recipe, sets, extraction_id, truth, force, store_path, as_json)


# ---------------------------------------------------------------------------------------------
# Using a model
# ---------------------------------------------------------------------------------------------
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
    from hefeat.learn.registry import predict_model

    s = predict_model(get_store(store_path), model_id, slides=split_ids(slides), top=top)
    done = f" ({s['already_predicted']} slides predicted earlier, kept)" if s.get("already_predicted") else ""
    emit(s, as_json, f"Predictions of {model_id}: {s['slides']} slides, {s['tiles']} tiles{done}. "
         f"Query: hefeat sql \"SELECT * FROM predictions WHERE model_id = '{model_id}'\"")


@main.command("report")
@click.argument("model_id")
@click.option("--out", default=None, help="Folder for the PNG plots (default: the model's folder).")
@store_option
@json_option
def report_cmd(model_id, out, store_path, as_json):
    """Headline and plots (PNG) of a fitted model, the way its paper reports it.

    \b
    Example:
      hefeat report gen-0123abcd
    """
    from hefeat.learn.report import report

    s = report(get_store(store_path), model_id, out)
    notes = "".join(f"\n  note: {n}" for n in s.get("notes") or [])
    emit(s, as_json, s["headline"] + notes + "\nPlots: " + (", ".join(s["files"]) or "none"))


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
      hefeat cartography trt-0123abcd --slide S01 --out map.png
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

    Slides of patients a trait model trained on have in-sample maps: their HTI is shown apart and
    never enters survival.

    \b
    Example:
      hefeat hti trt-0123abcd --out hti.csv
    """
    from hefeat.learn.traits import hti_summary, hti_table

    df = hti_table(get_store(store_path), model_id, out)
    s = {"model_id": model_id, **hti_summary(df)}
    n_held = s["n_heldout_slides"]
    text = (f"HTI for {len(df)} slides: held-out (test + OOD for every trait) {n_held} slides, mean "
            f"{s['mean_hti_heldout'] if s['mean_hti_heldout'] is None else round(s['mean_hti_heldout'], 3)}; "
            f"trained on {len(df) - n_held}, mean "
            f"{s['mean_hti_trained'] if s['mean_hti_trained'] is None else round(s['mean_hti_trained'], 3)} "
            "(in-sample maps)" + (f": {out}" if out else "") + "\n"
            + df[["slide_id", "hti", "positive_tiles", "heldout"]].to_string(index=False))
    emit(s, as_json, text)


@main.command()
@click.option("--model", "model_id", default=None, help="Traits model (default: the latest).")
@click.option("--by", default="hti", show_default=True)
@click.option("--threshold", default=0.5, show_default=True)
@click.option("--time-col", default="survival_months", show_default=True)
@click.option("--event-col", default="event", show_default=True)
@click.option("--max-follow-up", type=float, default=None,
              help="Cap follow-up here, in the time column's unit (default: 10 years, unit from the column name).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Kaplan–Meier PNG.")
@click.option("--rule", type=click.Choice(["auto", "crossfit", "heldout"]), default="auto", show_default=True,
              help="crossfit: every patient, maps from models that never saw it; heldout: PathoMCH's held-out "
                   "patients only; auto: crossfit when the model has cross-fitted maps.")
@store_option
@json_option
def survival(model_id, by, threshold, time_col, event_col, max_follow_up, out, rule, store_path, as_json):
    """Kaplan–Meier curves and log-rank test for HTI above vs below a threshold, on patients with honest maps.

    Cross-fitted maps (fit traits --crossfit 5, the default) let every patient in; --rule heldout keeps
    PathoMCH's rule (patients a trait model trained on excluded). HTI = 0 is skipped, follow-up is
    capped at 10 years.

    \b
    Example:
      hefeat survival --by hti --threshold 0.5 --out km.png
    """
    from hefeat.learn.traits import survival as surv
    from hefeat.store.models import newest_model

    st = get_store(store_path)
    chosen = "--model"
    if not model_id:
        model_id, n = newest_model(st, "traits")
        chosen = f"the newest of {n} traits model(s); pass --model to choose"
    s = surv(st, model_id, by=by, threshold=threshold, time_col=time_col, event_col=event_col,
             max_follow_up=max_follow_up, out=out, rule=rule)
    s = {"model_id": model_id, "model_chosen": chosen, **s}
    text = (f"Traits model {model_id} ({chosen}).\n{s['patients']}; {by} > {threshold}: {s['n_high']} vs {s['n_low']}; log-rank p = {s['logrank_p']:.3g} "
            f"({s['n_excluded_trained']} trained-on patients excluded, {s['n_skipped_hti_zero']} with HTI = 0 skipped, "
            f"{s['n_censored_at_cap']} censored at {s['max_follow_up']:g})" + (f"; plot {out}" if out else ""))
    text += "".join(f"\n  note: {n}" for n in s["notes"])
    emit(s, as_json, text)
