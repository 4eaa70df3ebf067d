"""`hefeat predict <job_id>`: the fine-tuned network (its registered fold) on slides the job did not see.

A finished job already wrote held-out predictions for every slide its folds tested. This applies the
registered fold's network (with the recipe's test-time augmentation) to the other slides of its
tiling — new or unlabelled ones — and refuses slides whose patient trained or validated that fold,
whose predictions would be in-sample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.atomic import read_json
from hefeat.store.catalog import Store


def predict_job(store: Store, jid: str, *, slides: list[str] | None = None, top: int = 20,
                device: str | None = None, workers: int | None = 0) -> dict:
    """Predictions of the job's network for `slides` (default: every slide of its tiling without one)."""
    import torch

    from hefeat.finetune import ddp
    from hefeat.finetune.data import TileImages, TileSource
    from hefeat.finetune.heads import FoldTargets, activate
    from hefeat.finetune.job import write_slide_predictions
    from hefeat.finetune.recipe import RunOptions, recipe_from_dict
    from hefeat.finetune.register import finished_job
    from hefeat.finetune.targets import tiled_slides
    from hefeat.finetune.tasks import get_task
    from hefeat.finetune.train import FoldSetup, build_net, infer, make_transform
    from hefeat.learn.models import load_table

    job = finished_job(store, jid)
    r = recipe_from_dict({"task": job["task"], "params": {k: v for k, v in job["recipe"].items() if k != "task"}})
    fold = job["summary"]["register_fold"]
    tiling = store.tiling(job["data"]["tiling_id"])
    f = next(x for x in job["folds"] if x["name"] == fold)
    seen = set(f["train_patients"]) | set(f["val_patients"])
    table = store.slides(tiled_slides(store, tiling["tiling_id"]))
    wanted = slides or [s for s in table["slide_id"] if not store.predictions_path(jid, s).exists()]
    unknown = sorted(set(wanted) - set(table["slide_id"]))
    if unknown:
        raise HefeatError(f"Slides not tiled in the job's tiling {tiling['tiling_id']}: {', '.join(unknown[:10])}")
    pats = table.set_index("slide_id")["patient_id"]
    in_sample = [s for s in wanted if pats[s] in seen]
    if slides and in_sample:
        raise HefeatError(f"Slides {', '.join(in_sample[:10])} belong to patients that trained {jid}'s fold {fold}: "
                          "their predictions would be in-sample (the held-out ones are already in the predictions view)")
    todo = [s for s in wanted if s not in set(in_sample)]
    out = {"model_id": jid, "fold": fold, "slides": len(todo), "tiles": 0,
           "skipped_in_sample": in_sample, "already_predicted": int(len(table) - len(wanted))}
    if not todo:
        return out
    tiles = pd.concat([store.tiles(tiling["tiling_id"], s).assign(slide_id=s) for s in todo], ignore_index=True)
    rows = table[table["slide_id"].isin(todo)]
    source = TileSource.from_samples(tiles, rows, size=int(tiling["size"]), mpp=float(tiling["mpp"]))
    done = read_json(layout.fold_dir(store.root, jid, fold) / layout.FOLD_DONE)
    ft = FoldTargets.from_dict(done["targets"])
    outputs = [str(x) for x in np.atleast_1d(_outputs(store, jid))]
    d = ddp.Dist(device=ddp.process_device(device, 0))
    kind = get_task(r.task).head(outputs)
    from hefeat.extract.compute import InputPlan

    s = FoldSetup(recipe=r, kind=kind, n_out=len(outputs), targets=np.zeros((len(tiles), 1), np.float32),
                  slide_of=source.slide_of, dataset=TileImages(source), fold_dir=layout.fold_dir(store.root, jid, fold),
                  job_id=jid, precision=job["precision"], dist=d, options=RunOptions(workers=workers),
                  workers=workers or 0, input_plan=InputPlan(**job["input_plan"]),
                  channels_last=job["precision_choice"]["channels_last"])
    net, cfg = build_net(r, len(outputs))
    net.load_state_dict(torch.load(s.fold_dir / layout.FOLD_BEST, map_location="cpu", weights_only=True)["model"])
    net = net.to(d.device).eval()
    pred = infer(s, lambda v: activate(kind, net(v), ft), np.arange(len(tiles)), make_transform(s, cfg),
                 tta=r.tta, width=len(outputs))
    metrics = load_table(store, jid, "metrics")
    write_slide_predictions(store, jid, r.task, outputs, tiles, pred, np.full(len(tiles), f"applied:{fold}", object),
                            metrics, top=top)
    store.compact_after_write("predictions", jid)
    out["tiles"] = int(len(tiles))
    return out


def _outputs(store: Store, jid: str):
    from hefeat.learn.models import load_model

    return load_model(store, jid)["arrays"]["outputs"]
