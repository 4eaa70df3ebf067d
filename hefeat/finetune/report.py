"""`hefeat report <job_id>` for fine-tuning jobs: learning curves, the paper-style headline, and the
frozen-vs-fine-tuned table on the same folds; `hefeat finetune status`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.finetune.heartbeat import job_state
from hefeat.finetune.tasks import get_task
from hefeat.store import layout
from hefeat.store.atomic import read_json
from hefeat.store.catalog import Store
from hefeat.store.jobs import job_exists, load_job
from hefeat.store.locks import lock_state


def headline(s: dict) -> str:
    """The sentence each paper reports, for this job's held-out predictions, with the frozen baseline (its task's)."""
    return get_task(s.get("task") or s["kind"].removeprefix("finetune-")).headline(s)


def job_status(store: Store, jid: str) -> dict:
    """The job's state from its heartbeat (done / running / stopped); per fold: finished / trained up to a
    checkpoint / not started, epochs, best epoch, last losses."""
    if not job_exists(store, jid):
        raise HefeatError(f"No fine-tuning job {jid!r} in {store.root} (see: hefeat finetune list)")
    job = load_job(store, jid)
    state, why = job_state(store.root, job)
    folds = []
    for f in job["folds"]:
        d = layout.fold_dir(store.root, jid, f["name"])
        hist = read_json(d / layout.FOLD_METRICS) if (d / layout.FOLD_METRICS).exists() else []
        claim = lock_state(d / layout.FOLD_CLAIM)
        fstate = ("finished" if (d / layout.FOLD_DONE).exists()
                  else f"training (claimed by {claim['host']}:{claim['pid']})" if claim and not claim["stale"]
                  else "not started" if not (d / layout.FOLD_LAST).exists()
                  else "training" if state == "running" else "interrupted (resumes from its checkpoint)")
        last = hist[-1] if hist else {}
        folds.append({"name": f["name"], "state": fstate, "epochs": len(hist), "best_epoch": last.get("best_epoch"),
                      "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss")})
    return {"job_id": jid, "task": job["task"], "status": job["status"], "state": state, "state_why": why,
            "backbone": job["recipe"]["backbone"], "split": job["split"], "folds": folds}


def report_job(store: Store, jid: str, out: str | Path | None = None) -> dict:
    """PNG learning curves and the frozen-vs-fine-tuned comparison; the headline and the table."""
    from hefeat.figures.metrics import comparison, learning_curves
    from hefeat.learn.models import load_model, load_table

    meta = load_model(store, jid)
    s = dict(meta["summary"])
    out = Path(out) if out else layout.model_report_dir(store.root, jid)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    hist = load_table(store, jid, "history")
    cols = ["train_loss"] + (["val_loss"] if hist["val_loss"].notna().any() else [])
    one = hist["fold"].nunique() == 1
    p = out / layout.FIG_LEARNING_CURVES
    task = get_task(s["task"])
    loss = task.loss_label
    learning_curves(hist[["fold", "epoch", *cols]].astype({c: float for c in cols}), metrics=cols, out=p,
                    best=float(hist["best_epoch"].iloc[-1]) if one else None,
                    title=f"{jid}: {s['backbone']} fine-tuned ({s['kind']}), loss on {loss}, "
                          f"{hist['fold'].nunique()} fold(s) of {s['split']}")
    files.append(str(p))
    table = pd.DataFrame()
    if layout.model_table_path(store.root, jid, "frozen_vs_finetuned").exists():
        table = load_table(store, jid, "frozen_vs_finetuned")
        rows = task.comparison_rows(table)
        if len(rows):
            p = out / layout.FIG_FROZEN_VS_FINETUNED
            metric = rows["metric"].iloc[0]
            ci = rows["lo"].notna().all()
            comparison(rows.rename(columns={"value": metric}), value=metric, label="name", group="model",
                       lo="lo" if ci else None, hi="hi" if ci else None, out=p,
                       title=f"{jid}: held-out {metric}, fine-tuned vs frozen, same folds",
                       reference=task.reference[0], reference_label=task.reference[1])
            files.append(str(p))
    s["headline"] = headline(s)
    s["files"] = files
    s["frozen_vs_finetuned"] = table.head(50).to_dict("records")
    return s
