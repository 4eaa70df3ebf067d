"""`hefeat demo`."""

from __future__ import annotations

import click

from hefeat.cli.common import (
    emit,
    json_option,
    main,
    store_option,
)


@main.command()
@click.option("--data", default="data/demo", show_default=True, help="Where the synthetic cohort is written.")
@click.option("--slides", "n_slides", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--encoder", default=None, help="Encoder for the demo extraction (default: efficientnet-lite0, ImageNet weights installed with hefeat).")
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
