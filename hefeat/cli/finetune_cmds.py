"""Fine-tuning commands: hefeat finetune run | status | list (reports: hefeat report <job_id>)."""

from __future__ import annotations

import click

from hefeat.cli.common import emit, get_store, json_option, main, progress_enabled, store_option
from hefeat.errors import HefeatError


def _overrides(sets: tuple[str, ...], tiling: str | None) -> dict:
    import yaml

    out = {}
    for s in sets:
        k, eq, v = s.partition("=")
        if not eq or not k.strip():
            raise HefeatError(f"--set expects KEY=VALUE (e.g. --set epochs=5), got {s!r}")
        out[k.strip()] = yaml.safe_load(v)
    if tiling:
        out["tiling_id"] = tiling
    return out


@main.group()
def finetune():
    """End-to-end fine-tuning jobs (ST-Net, EMO, PathoMCH): a timm backbone + head trained on the store's tiles.

    \b
    Example:
      hefeat finetune run --config configs/stnet-finetune.yaml
      torchrun --nproc_per_node 4 -m hefeat.cli finetune run --config configs/stnet-finetune.yaml
      hefeat report ft-0123abcd4567
      hefeat extract --encoder finetuned:ft-0123abcd4567
    """


@finetune.command("run")
@click.option("--config", "config_path", required=True, help="A recipe: configs/{stnet,emo,traits}-finetune.yaml.")
@click.option("--set", "sets", multiple=True, help="Override a recipe parameter, e.g. --set epochs=5 (repeat).")
@click.option("--tiling", default=None, help="Tiling id (default: the store's only tiling of the task's kind).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu).")
@click.option("--workers", type=int, default=None, help="DataLoader workers per process (default: CPUs - 1).")
@click.option("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's; 1 on a busy machine).")
@click.option("--checkpoint-every", default=50, show_default=True, help="Also checkpoint every N optimiser steps.")
@click.option("--force", is_flag=True, help="Train again even if this exact job finished.")
@click.option("--no-wait", "no_wait", is_flag=True,
              help="Do the folds no other process holds, then stop (instead of waiting for the others).")
@store_option
@json_option
def run_cmd(config_path, sets, tiling, device, workers, threads, checkpoint_every, force, no_wait, store_path, as_json):
    """Train every fold of a recipe; the same command resumes after a crash (kill -9 included).

    Under torchrun each process takes one GPU (or CPU share) and the slides are sharded between them.
    Several runs of the same job (e.g. two cluster tasks) share its folds: each claims a fold before
    training it and skips one another live process holds, then waits for it (or stops: --no-wait).

    \b
    Example:
      hefeat finetune run --config configs/emo-finetune.yaml --set epochs=20 --json
    """
    from hefeat.finetune.job import run_job
    from hefeat.finetune.recipe import RunOptions, load_recipe

    recipe = load_recipe(config_path, _overrides(sets, tiling))
    opts = RunOptions(device=device, threads=threads, workers=workers, checkpoint_every=checkpoint_every, force=force,
                      progress=progress_enabled(as_json), wait=not no_wait)
    s = run_job(get_store(store_path), recipe, opts)
    if "rank" in s:  # torchrun: only rank 0 reports
        return
    emit(s, as_json, _run_text(s))


def _run_text(s: dict) -> str:
    from hefeat.finetune.report import headline

    cached = " (already trained: loaded from the store)" if s.get("cached") else ""
    return (f"Job {s['job_id']} ({s['kind']}){cached}: {headline(s)}\n"
            f"Encoder: hefeat extract --encoder {s['encoder']}   Report: hefeat report {s['job_id']}")


@finetune.command("status")
@click.argument("job_id")
@store_option
@json_option
def status_cmd(job_id, store_path, as_json):
    """Where a job stands (done / running / stopped, from its heartbeat): per fold, epochs, best epoch, losses.

    \b
    Example:
      hefeat finetune status ft-0123abcd4567
    """
    from hefeat.finetune.report import job_status

    s = job_status(get_store(store_path), job_id)
    lines = [f"Job {job_id} ({s['task']}, {s['backbone']}): {s['state']} ({s['state_why']})"]
    for f in s["folds"]:
        lines.append(f"  {f['name']}: {f['state']}, {f['epochs']} epochs, best {f['best_epoch']}, "
                     f"train loss {f['train_loss']}, val loss {f['val_loss']}")
    emit(s, as_json, "\n".join(lines))


@finetune.command("list")
@store_option
@json_option
def list_cmd(store_path, as_json):
    """Fine-tuning jobs in the store.

    \b
    Example:
      hefeat finetune list --json
    """
    from hefeat.finetune.heartbeat import job_state

    st = get_store(store_path)
    df = st.sql("SELECT * FROM jobs ORDER BY created")
    if len(df):  # the recorded status says "running" for a job killed mid-run: its heartbeat says what is true
        df.insert(1, "state", [job_state(st.root, r)[0] for r in df.to_dict("records")])
    emit({"jobs": df.to_dict("records")}, as_json, df.to_string(index=False) if len(df) else "No fine-tuning jobs yet.")
