"""A finished job's backbone as an encoder (`finetuned:<job_id>[:<fold>]`) and its per-output heads.

The backbone of one fold (the recipe's register_fold, default the first) is exported as a
safetensors file that timm's own model loads, with encoder.json recording the job, its data
fingerprints, its split and which patients it trained on — so features extracted with it are only
"held-out" for the fold's test patients, and the provenance says so. The head is one linear layer:
row j is output j's head, readable on its own (gene_head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.atomic import atomic_path, write_json
from hefeat.store.catalog import Store
from hefeat.store.jobs import job_exists, known_jobs, load_job

PREFIX = "finetuned:"


def parse_name(name: str) -> tuple[str, str | None]:
    """'finetuned:<job_id>[:<fold>]' -> (job_id, fold or None)."""
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else name
    jid, _, fold = rest.partition(":")
    if not jid:
        raise HefeatError(f"Encoder {name!r}: expected finetuned:<job_id> or finetuned:<job_id>:<fold>")
    return jid, fold or None


def finished_job(store: Store, jid: str) -> dict:
    """A job's record (job.json), refusing a job that is missing or has not finished."""
    if not job_exists(store, jid):
        known = known_jobs(store)
        raise HefeatError(f"No fine-tuning job {jid!r} in {store.root}. Known: {', '.join(known[:10]) or 'none'}")
    job = load_job(store, jid)
    if job.get("status") != "finished":
        raise HefeatError(f"Job {jid} is {job.get('status')}: run it to the end (hefeat finetune run) before using its encoder")
    return job


def _best_state(store: Store, jid: str, fold: str) -> dict:
    from hefeat.finetune.checkpoint import load_checkpoint

    ck = load_checkpoint(layout.fold_dir(store.root, jid, fold) / layout.FOLD_BEST)
    if ck is None:
        raise HefeatError(f"Job {jid} has no fold {fold!r} with trained weights")
    return ck["model"]


def backbone_file(store: Store, jid: str, fold: str) -> Path:
    """The fold's backbone as safetensors (exported from best.pt on first use, atomically)."""
    from safetensors.torch import save_file

    p = layout.job_backbone_path(store.root, jid, fold)
    if not p.exists():
        sd = {k.removeprefix("backbone."): v.contiguous() for k, v in _best_state(store, jid, fold).items()
              if k.startswith("backbone.")}
        with atomic_path(p, kind="encoder.backbone") as tmp:
            save_file(sd, str(tmp))
    return p


def export_encoder(store: Store, jid: str, fold: str, recipe, data, results: dict, precision: str) -> dict:
    """Write the registered encoder (backbone file + encoder.json); returns its record plus the head arrays."""
    backbone_file(store, jid, fold)
    job = load_job(store, jid)
    folds = {f["name"]: f for f in job["folds"]}
    enc = finetuned_encoder(store, f"{PREFIX}{jid}:{fold}", _job_record=job)
    sd = _best_state(store, jid, fold)
    t = results[fold]["targets"]
    rec = {"encoder": f"{PREFIX}{jid}", "fold": fold, "backbone": recipe.backbone, "weights_init": recipe.weights,
           "dim": enc.config.dim, "input_size": list(enc.config.input_size), "mean": list(enc.config.mean),
           "std": list(enc.config.std), "interpolation": enc.config.interpolation,
           "weights_digest": enc.config.weights_digest, "job_id": jid, "task": recipe.task,
           "split": job["split"], "data": job["data"], "precision": precision,
           "train_patients": folds[fold]["train_patients"], "val_patients": folds[fold]["val_patients"],
           "test_patients": folds[fold]["test_patients"],
           "note": "features of this encoder are held-out only for test_patients: the backbone trained on the others"}
    write_json(layout.job_encoder_dir(store.root, jid) / layout.ENCODER_META, rec, kind="encoder.meta")
    rec["heads"] = {"head_weight": sd["head.weight"].float().numpy(), "head_bias": sd["head.bias"].float().numpy(),
                    "outputs": np.array(list(data.outputs)), "target_mean": np.asarray(t["mean"], np.float32),
                    "target_std": np.asarray(t["std"], np.float32), "kept": np.asarray(t["mask"], bool)}
    return rec


def finetuned_encoder(store: Store | None, name: str, *, layer: str | None = None, seed: int = 0, _job_record=None):
    """The backbone of a finished job as a frozen hefeat Encoder (create_encoder's 'finetuned:' source)."""
    import dataclasses

    from hefeat.extract.encoders import create_encoder

    if store is None:
        raise HefeatError(f"Encoder {name!r} lives in a store: pass the store (hefeat extract --store PATH)")
    jid, fold = parse_name(name)
    job = _job_record or finished_job(store, jid)
    names = [f["name"] for f in job["folds"]]
    fold = fold or job["recipe"].get("register_fold") or names[0]
    if fold not in names:
        raise HefeatError(f"Job {jid} has no fold {fold!r}; folds: {', '.join(names)}")
    r = job["recipe"]
    enc = create_encoder(r["backbone"], weights=str(backbone_file(store, jid, fold)), layer=layer, seed=seed)
    size = r.get("input_size")
    cfg = dataclasses.replace(enc.config, name=f"{PREFIX}{jid}:{fold}", weights=f"{jid}:{fold}",
                              input_size=(size, size) if size else enc.config.input_size)
    enc.config = cfg
    from hefeat.store.ids import content_id

    enc.provenance = {"job_id": jid, "fold": fold, "split": job["split"], "data": content_id(job["data"]),
                      "backbone": r["backbone"], "task": job["task"],
                      "train_patients": ",".join(next(f["train_patients"] for f in job["folds"] if f["name"] == fold))}
    return enc


def gene_head(store: Store, jid: str, output: str) -> tuple[np.ndarray, float]:
    """(weights (dim,), bias) of one output's head in target units: prediction = features @ w + b.

    The features are the registered encoder's (`finetuned:<job_id>`), so an extraction with it plus
    this head reproduces the network's prediction for that gene (or label logit) without the rest.
    """
    from hefeat.learn.models import load_model

    A = load_model(store, jid).get("arrays", {})
    if "head_weight" not in A:
        raise HefeatError(f"{jid} is not a fine-tuning job with heads")
    outs = [str(x) for x in A["outputs"]]
    if output not in outs:
        raise HefeatError(f"Job {jid} has no output {output!r}; e.g. {', '.join(outs[:5])}")
    j = outs.index(output)
    return A["head_weight"][j] * A["target_std"][j], float(A["head_bias"][j] * A["target_std"][j] + A["target_mean"][j])
