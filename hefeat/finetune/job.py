"""A fine-tuning job: folds from the frozen fits' split functions, one resumable training per fold,
held-out evaluation against frozen features on the same folds, and the results back in the store.

Several processes may run one job (two cluster tasks started with the same recipe): before training a
fold its process group claims it (rank 0 holds a hefeat.store.locks claim for all its ranks), and a
fold another live process holds is skipped, then waited for (RunOptions.wait) while this process
does the others; the claim of a dead holder is taken over and its fold resumes from its checkpoint.
The commit is claimed the same way, so one process commits and the others find the job finished; the
start-up write of job.json (status running) takes that claim too and looks again for a committed model
under it, so a process started just after another committed never rewrites the finished record.

jobs/<job_id>/  job.json (recipe, data fingerprints, folds and their patients, status), index.json
                fold=<name>/  last.pt (resume), best.pt (kept), metrics.csv/.json, predictions.npz, done.json,
                              claim.lock while a process (group) trains it
status/finetune=<job_id>/<fold>.json  a finished fold's commit record (the per-slide runner's, as a slide's)
                encoder/      backbone-<fold>.safetensors + encoder.json (the registered encoder's provenance)
models/<job_id>/ the job as a model (kind finetune-<task>): summary, metrics tables, per-output heads
predictions/model=<job_id>/   held-out tile/spot predictions, in the predictions view
"""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np
import pandas as pd

from hefeat import __version__
from hefeat.errors import HefeatError
from hefeat.finetune import ddp, heartbeat
from hefeat.finetune.faults import fault_point
from hefeat.finetune.heads import fold_targets, output_bias
from hefeat.finetune.recipe import Recipe, RunOptions
from hefeat.finetune.targets import TaskData
from hefeat.finetune.tasks import get_task
from hefeat.heap import reuse_freed_memory
from hefeat.runner import SlideRunner
from hefeat.store import layout
from hefeat.store.atomic import atomic_path, clean_stale_tmp, read_json, write_json
from hefeat.store.catalog import Store
from hefeat.store.ids import finetune_job_id
from hefeat.store.jobs import job_exists, job_finished, load_job, save_job
from hefeat.store.locks import SlideClaim, lock_state
from hefeat.store.predictions import write_predictions
from hefeat.store.runs import timestamp

JOB_PREFIX = "ft-"
WAIT_POLL_S = 30.0  # how often a process waiting for another's fold (or commit) looks again


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.dtype).encode() + str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def data_fingerprints(data: TaskData) -> dict:
    """Content fingerprints of everything a job reads: slide files, tiles, targets/labels, units."""
    s = data.samples
    return {
        "tiling_id": data.tiling["tiling_id"],
        "slides": _digest(data.slides["slide_id"].to_numpy(str), data.slides["fingerprint"].to_numpy(str),
                          data.slides["mpp_x"].to_numpy(float)),
        "tiles": _digest(s["slide_id"].to_numpy(str), s["tile_id"].to_numpy(np.int64), s[["x", "y"]].to_numpy(np.int64)),
        "targets": _digest(list(data.outputs), data.train_targets, np.asarray(data.unit_targets, np.float64)),
        "units": _digest(data.units["unit_id"].to_numpy(str), data.units["patient_id"].to_numpy(str)),
        "n_samples": len(s), "n_units": len(data.units),
    }


def job_id(recipe: Recipe, fingerprints: dict, precision: str) -> str:
    """Content-derived (hefeat.store.ids.finetune_job_id): recipe, resolved precision, data fingerprints, code version."""
    return finetune_job_id(recipe.to_dict(), precision, fingerprints)


def make_folds(r: Recipe, data: TaskData):
    """FoldPlans (sample indices) from hefeat.learn.splits over the units, plus a patient-grouped validation part."""
    from hefeat.finetune.train import FoldPlan
    from hefeat.learn.splits import assert_disjoint, group_holdout, parse_split, site_split

    ids = data.units["unit_id"].to_numpy(str)
    groups = data.units["patient_id"].to_numpy(str)
    folds = [site_split(data.units["site"].to_numpy(str), seed=r.seed)] if r.split == "site" else \
        parse_split(r.split, ids, groups, seed=r.seed)
    if r.folds:
        names = [f.name for f in folds]
        unknown = [f for f in r.folds if f not in names]
        if unknown:
            raise HefeatError(f"Empty split: no fold named {', '.join(unknown)} in split {r.split!r}; "
                              f"folds are {', '.join(names)}")
        folds = [f for f in folds if f.name in r.folds]
    unit_of = data.unit_of
    labelled = ~np.isnan(data.train_targets).all(1)
    plans = []
    for f in folds:
        tr, te = np.asarray(f.train), np.asarray(f.test)
        va = np.asarray(f.val) if f.val is not None else np.zeros(0, np.int64)
        if f.val is None and r.val_share > 0 and len(np.unique(groups[tr])) >= 2:
            h = group_holdout(groups[tr], r.val_share, seed=r.seed)
            tr, va = tr[h.train], tr[h.test]
        assert_disjoint(groups, tr, va, te)
        train = np.flatnonzero(np.isin(unit_of, tr) & labelled)
        val = np.flatnonzero(np.isin(unit_of, va) & labelled)
        test = np.flatnonzero(np.isin(unit_of, te))
        if len(train) == 0 or len(test) == 0:
            raise HefeatError(f"Empty split: fold {f.name} of {r.split!r} has {len(train)} labelled training and "
                              f"{len(test)} test samples; use another split or more slides")
        plans.append(FoldPlan(f.name, train, val, test))
    if not plans:
        raise HefeatError(f"Empty split: {r.split!r} gives no folds")
    return plans


def resolve_tiling(store: Store, r: Recipe, d: ddp.Dist) -> Recipe:
    """The recipe with tiling_id set from its `tiling:` section (tiling the store first if needed)."""
    import dataclasses

    if r.tiling_id or not r.tiling:
        return dataclasses.replace(r, tiling=None)
    from hefeat.slides.run import run_tiling, tiling_id
    from hefeat.slides.tiling import TilingParams

    params = TilingParams(**r.tiling)
    tid = tiling_id(params)
    if d.main and not layout.tiling_meta_path(store.root, tid).exists():
        t = run_tiling(store, params)
        if t.failed:
            sid, why = next(iter(t.failed.items()))
            raise HefeatError(f"Tiling the recipe's {r.tiling} failed for {len(t.failed)} slides (e.g. {sid}: {why})")
    ddp.barrier(d)
    return dataclasses.replace(r, tiling_id=tid, tiling=None)


def run_job(store: Store, recipe: Recipe, options: RunOptions | None = None) -> dict:
    """Train every fold of a recipe (resuming what a crash left), evaluate, and commit the job to the store."""
    import torch

    opts = options or RunOptions()
    store.require()
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    d = ddp.setup(opts.device)
    try:
        with heartbeat.session():  # a heartbeat started in _run ends with it, however it ends
            return _run(store, recipe, opts, d)
    finally:
        ddp.teardown(d)
        torch.set_num_threads(threads)


def calibration_batches(device: str, micro_batch: int) -> tuple[int | None, ...]:
    """Batch sizes the training calibration times: the job's micro-batch on a GPU, the sample itself on a CPU.

    A GPU step on the 2-16 sampled tiles is launch-bound: on an H200 DenseNet-121 timed 319 images/s in fp32 and
    321 in bf16 that way (fp32 kept) against 1,200 images/s for the job's batch of 64. The sample is repeated to
    the micro-batch (hefeat.extract.precision._batch). On a CPU the cost per image hardly depends on the batch."""
    return (micro_batch,) if device.startswith("cuda") else (None,)


def choose_precision(r: Recipe, data: TaskData, dataset, train: np.ndarray, d: ddp.Dist):
    """(PrecisionChoice, InputPlan): the extraction's measured AMP choice, timed on a training step over
    real training tiles (rank 0 decides, every rank follows), and how tiles become the backbone's input."""
    import copy
    import dataclasses

    import torch

    from hefeat.extract.compute import DeviceTransform, plan_input
    from hefeat.extract.precision import select_precision
    from hefeat.finetune.data import micro_batch_size
    from hefeat.finetune.train import build_net, training_step

    net, cfg = build_net(r, len(data.outputs))
    try:
        plan = plan_input(int(data.tiling["size"]), float(data.tiling["mpp"]), cfg, fit=r.fit)
    except HefeatError as e:  # the advice names extract's option; a job takes it as a recipe value
        raise HefeatError(re.sub(r"--fit (\w+)", r"--set fit=\1", str(e))) from None
    choice = None
    if d.main:
        n = min(16, max(2, micro_batch_size(r.batch_size, r.accumulate, d.world))) if r.precision == "auto" else 2
        pick = train[np.linspace(0, len(train) - 1, n).astype(int)]
        imgs = torch.stack([dataset[int(i)][0] for i in pick]) if r.precision == "auto" else \
            torch.zeros((n, plan.tile_px, plan.tile_px, 3), dtype=torch.uint8)
        probe = copy.deepcopy(net).to(d.device).train()
        sample = DeviceTransform(cfg, d.device, plan=plan)(imgs)
        key = {"backbone": r.backbone, "weights": r.weights, "plan": plan.to_dict(), "outputs": len(data.outputs),
               "mode": "train"}
        try:
            mb = micro_batch_size(r.batch_size, r.accumulate, d.world)
            choice = select_precision(probe, sample, device=d.device, requested=r.precision, model_key=key,
                                      step=training_step, batch_sizes=calibration_batches(d.device, mb))
        except HefeatError as e:  # a calibration that could not decide (e.g. timings swamped by a busy machine)
            choice = dataclasses.replace(select_precision(probe, sample, device=d.device, requested="fp32"),
                                         reason=f"auto: calibration failed ({e}); fp32")
        dataset.close()
    return ddp.broadcast(d, choice), plan


def _run(store: Store, r: Recipe, opts: RunOptions, d: ddp.Dist) -> dict:
    from hefeat.extract.pipeline import default_workers
    from hefeat.finetune.data import TileImages, TileSource
    from hefeat.finetune.train import FoldSetup
    from hefeat.learn.models import model_exists, model_summary

    t0 = time.perf_counter()
    r = resolve_tiling(store, r, d)
    task = get_task(r.task)
    data = task.load(store, r)
    plans = make_folds(r, data)
    source = TileSource.from_samples(data.samples, data.slides, size=int(data.tiling["size"]), mpp=float(data.tiling["mpp"]))
    dataset = TileImages(source)
    choice, input_plan = choose_precision(r, data, dataset, plans[0].train, d)
    precision = choice.precision
    fps = data_fingerprints(data)
    jid = job_id(r, fps, precision)
    if model_exists(store, jid) and not opts.force and job_finished(store, jid):
        return {**model_summary(store, jid, cached=True), "job_id": jid}
    jdir = store.job_dir(jid)
    split_name = f"{r.split} seed={r.seed}"
    if d.main:
        jdir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(jdir)
    # The start-up record is written under the commit's claim, after looking again for a committed model:
    # another process of this job may have committed since the look above, and its finished record
    # (summary, encoder) must not be overwritten by a "running" one.
    start_claim = _claim_waiting(layout.job_commit_claim_path(store.root, jid), "the commit", jid, d, opts)
    try:
        if ddp.broadcast(d, d.main and model_exists(store, jid) and not opts.force):  # committed by another process
            return _cached(store, jid, d)
        if d.main:
            job = {"job_id": jid, "task": r.task, "status": "running", "recipe": r.to_dict(), "precision": precision,
                   "precision_choice": choice.to_dict(), "input_plan": input_plan.to_dict(),
                   "data": fps, "split": split_name, "folds": _fold_record(data, plans), "code_version": __version__,
                   "device": d.device, "processes": d.world, "created": _created(store, jid), "updated": timestamp()}
            save_job(store, jid, job)
    finally:
        if start_claim is not None:
            start_claim.release()
    if d.main:
        heartbeat.start(store.root, jid)
    ddp.barrier(d)
    _check_slides(data, d)
    workers = default_workers() if opts.workers is None else opts.workers
    n_out = len(data.outputs)
    base = FoldSetup(recipe=r, kind=data.kind, n_out=n_out, targets=data.train_targets, slide_of=source.slide_of,
                     dataset=dataset, fold_dir=jdir, job_id=jid, precision=precision, dist=d,
                     options=opts, workers=workers, input_plan=input_plan, channels_last=choice.channels_last)
    with reuse_freed_memory():  # each step's activations and gradients reuse the last step's memory (hefeat.heap)
        _train_folds(store, plans, jdir, base, data, source, opts)
    oof = np.full((len(data.samples), n_out), np.nan)
    fold_of = np.full(len(data.samples), "", object)
    kept = np.ones(n_out, bool)
    results = {}
    for plan in plans:
        fdir = layout.fold_dir_in(jdir, plan.name)
        done = read_json(fdir / layout.FOLD_DONE)
        with np.load(fdir / layout.FOLD_PREDICTIONS) as z:
            if not np.array_equal(z["test"], plan.test):
                raise HefeatError(f"Fold {plan.name} of job {jid} was predicted on other samples; delete {fdir} to redo it")
            oof[plan.test] = z["pred"]
        fold_of[plan.test] = plan.name
        kept &= np.asarray(done["targets"]["mask"], bool)
        results[plan.name] = done
    commit_claim = _claim_waiting(layout.job_commit_claim_path(store.root, jid), "the commit", jid, d, opts)
    try:
        if ddp.broadcast(d, d.main and model_exists(store, jid) and not opts.force):  # committed by another process
            return _cached(store, jid, d)
        return _evaluate_and_commit(store, r, task, data, plans, results, oof, fold_of, kept, split_name, base,
                                    jid, precision, t0)
    finally:
        if commit_claim is not None:
            commit_claim.release()


def _evaluate_and_commit(store, r, task, data, plans, results, oof, fold_of, kept, split_name, base, jid, precision,
                         t0) -> dict:
    d = base.dist
    tested = fold_of != ""
    summary, tables = task.evaluate(data, oof, tested, split_name, kept=kept)
    if r.baseline != "none":
        F = _baseline_features(store, r, data, jid, base, plans)
        bpred = np.full_like(oof, np.nan)
        for plan in plans:
            bpred[plan.test] = task.baseline(data, F, np.concatenate([plan.train, plan.val]), plan.test, seed=r.seed)
        bsum, btab = task.evaluate(data, bpred, tested, split_name, kept=kept)
        summary.update({f"frozen_{k}": v for k, v in bsum.items() if k != "split"})
        tables["frozen_vs_finetuned"] = task.compare_tables(tables["metrics"], btab["metrics"])
    if task.extra_summary is not None:
        summary.update(task.extra_summary(r, int(kept.sum()), results))
    if not d.main:
        return {"job_id": jid, "rank": d.rank}
    fault_point("job-commit")
    return _commit(store, r, data, plans, results, oof, fold_of, kept, summary, tables, jid, precision, t0)


def _train_folds(store: Store, plans, jdir, base, data: TaskData, source, opts: RunOptions) -> None:
    """Train every fold not done yet that no other live process holds; then wait for (or stop at) the others.

    The folds go through the per-slide runner (hefeat.runner.SlideRunner, stage layout.FOLD_STAGE, the job id
    as key, the fold name as the 'slide'): rank 0 claims a fold for its process group and, once the fold's
    done record is in place, commits it with a status record like a slide's (status/finetune=<job>/<fold>.json);
    a fold is done when its record is (hefeat.store.commit.is_done)."""
    d = base.dist
    runner = SlideRunner(store, layout.FOLD_STAGE, base.job_id) if d.main else None
    try:
        pending = list(plans)
        while True:
            busy = {}
            for plan in pending:
                holder = _train_fold_if_free(plan, jdir, base, data, source, runner)
                if holder is not None:
                    busy[plan.name] = holder
            if not busy:
                return
            pending = [p for p in pending if p.name in busy]
            _wait_or_stop(busy, base.job_id, opts)
    finally:
        if runner is not None:
            runner.close()  # claims still held (a fold interrupted) are released; the fold stays not done


def _adopt_done_fold(runner, fold: str) -> None:
    """A fold whose done record is there without its commit record (trained before folds were recorded, or
    killed between the two writes) is recorded now: its done record is written last, atomically."""
    from hefeat.store import commit

    store, key = runner.store, runner.key
    if layout.output_path(store.root, layout.FOLD_STAGE, key, fold).exists() and \
            not commit.is_done(store, layout.FOLD_STAGE, key, fold):
        commit.commit_ok(store, layout.FOLD_STAGE, key, fold, n_tiles=0, seconds=0.0, digest=None, adopted=True)


def _train_fold_if_free(plan, jdir, base, data: TaskData, source, runner) -> str | None:
    """Train one fold unless it is done or another live process holds it; None when it is done, else its holder."""
    from hefeat.finetune.train import predict_fold, train_fold

    d, r = base.dist, base.recipe
    fdir = layout.fold_dir_in(jdir, plan.name)
    task, holder = None, None
    if d.main:
        fdir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(fdir)
        _adopt_done_fold(runner, plan.name)
        task = next(iter(runner.claimed([plan.name])), None)
        if task is None and runner.summary.busy.pop(plan.name, None) is not None:
            st = lock_state(layout.lock_path(runner.store.root, layout.FOLD_STAGE, base.job_id, plan.name)) or {}
            holder = f"{st.get('host')}:{st.get('pid')}, last seen {st.get('age_s', 0):.0f} s ago"
    train, holder = ddp.broadcast(d, (task is not None, holder))
    if not train:
        return holder  # None: done (before, or by its previous holder meanwhile)
    s = _replace(base, fold_dir=fdir)
    ft = fold_targets(data, plan.train, min_variance=r.min_variance, standardize=r.standardize_targets)
    res = train_fold(s, plan, ft, output_bias(data.kind, data, plan.train, ft))
    res["slides_per_rank_per_epoch"] = [[[source.slide_ids[k] for k in rank] for rank in ep]
                                        for ep in res["slides_per_rank_per_epoch"]]
    pred = predict_fold(s, plan, ft)
    if d.main:
        with atomic_path(fdir / layout.FOLD_PREDICTIONS) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, test=plan.test, pred=pred)
        fault_point("fold-done")
        write_json(fdir / layout.FOLD_DONE, {**res, "fold": plan.name, "targets": ft.to_dict(),
                                             "finished": timestamp()})
        if not runner.ok(task, n_tiles=len(plan.test), digest=None):  # the fold's commit record (claim released)
            raise HefeatError(f"Job {base.job_id}: fold {plan.name} trained but not recorded "
                              f"({runner.summary.failed.get(plan.name)})")
        (fdir / layout.FOLD_LAST).unlink(missing_ok=True)
    ddp.barrier(d)
    return None


def _claim(path, d: ddp.Dist) -> tuple[SlideClaim | None, str | None]:
    """(claim, None) when this process group now holds `path` (rank 0 holds it for every rank; the others get
    (None, None)), or (None, 'host:pid') when another live process holds it. A dead holder's claim is taken over."""
    claim, holder = None, None
    if d.main:
        c = SlideClaim(path)
        if c.acquire():
            claim = c
        else:
            st = lock_state(path) or {}
            holder = f"{st.get('host')}:{st.get('pid')}, last seen {st.get('age_s', 0):.0f} s ago"
    return claim, ddp.broadcast(d, holder)


def _claim_waiting(path, what: str, jid: str, d: ddp.Dist, opts: RunOptions) -> SlideClaim | None:
    """Claim `path`, waiting (or stopping, see RunOptions.wait) while another live process holds it."""
    while True:
        claim, holder = _claim(path, d)
        if holder is None:
            return claim
        _wait_or_stop({what: holder}, jid, opts)


def _wait_or_stop(busy: dict[str, str], jid: str, opts: RunOptions) -> None:
    """Pause before another look at what other live processes hold ({what: holder}), or stop when not waiting."""
    if not opts.wait:
        held = "; ".join(f"{k} is held by {v}" for k, v in busy.items())
        raise HefeatError(f"Job {jid}: {held} (another process of this job); this process did everything else. "
                          "Run the same command again to finish the job (it waits for the other process)")
    _pause(WAIT_POLL_S)


def _pause(seconds: float) -> None:
    """Wait before looking again at claims other processes hold (tests replace it)."""
    time.sleep(seconds)


def _replace(s, **kw):
    import dataclasses

    return dataclasses.replace(s, **kw)


def _created(store: Store, jid: str) -> str:
    return load_job(store, jid)["created"] if job_exists(store, jid) else timestamp()


def _fold_record(data: TaskData, plans) -> list[dict]:
    pats = data.samples["patient_id"].to_numpy(str)
    return [{"name": p.name, "n_train": len(p.train), "n_val": len(p.val), "n_test": len(p.test),
             "train_patients": sorted(set(pats[p.train])), "val_patients": sorted(set(pats[p.val])),
             "test_patients": sorted(set(pats[p.test]))} for p in plans]


def _check_slides(data: TaskData, d: ddp.Dist) -> None:
    """Every slide opens and is the file that was ingested (fingerprint), checked once per job, split over ranks."""
    from hefeat.slides.reader import open_catalog_slide

    for _, row in data.slides.iloc[d.rank::d.world].iterrows():
        try:
            with open_catalog_slide(row, verify=True):
                pass
        except HefeatError as e:
            raise HefeatError(f"slide {row['slide_id']}: {e}") from None


def _baseline_features(store: Store, r: Recipe, data: TaskData, jid: str, base, plans) -> np.ndarray:
    """Frozen features of every sample: the job's initial backbone (cached in the job folder) or an extraction."""
    if r.baseline != "init":
        from hefeat.store.features import read_features

        ext = store.extraction(r.baseline)
        if ext["tiling_id"] != data.tiling["tiling_id"]:
            raise HefeatError(f"Baseline extraction {r.baseline} is on tiling {ext['tiling_id']}, the job on "
                              f"{data.tiling['tiling_id']}; use an extraction of the same tiling or baseline: init")
        F = np.zeros((len(data.samples), int(ext["dim"])), np.float32)
        for sid, idx in data.samples.groupby("slide_id", sort=False).indices.items():
            p = store.features_path(r.baseline, sid)
            if not p.exists():
                raise HefeatError(f"Baseline extraction {r.baseline} has no features for slide {sid}")
            F[idx] = read_features(p, data.samples["tile_id"].to_numpy()[idx])
        return F
    import torch

    from hefeat.finetune.train import build_net, infer, make_transform

    path = layout.job_baseline_features_path(store.root, jid)
    if path.exists():
        return np.load(path)
    net, cfg = build_net(r, len(data.outputs))
    fmt = torch.channels_last if base.channels_last else torch.contiguous_format
    bb = net.backbone.to(base.dist.device).to(memory_format=fmt).eval()
    every = np.arange(len(data.samples))
    F = infer(base, lambda v: bb(v).float().cpu().numpy(), every, make_transform(base, cfg),
              tta=r.tta, width=cfg.dim).astype(np.float32)
    if base.dist.main:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, F)
    return F


def _commit(store, r, data, plans, results, oof, fold_of, kept, summary, tables, jid, precision, t0) -> dict:
    """Predictions into the predictions view, the registered encoder, the job as a model, job.json finished."""
    from hefeat.finetune.register import export_encoder
    from hefeat.learn.models import model_summary, save_model

    for folder in (layout.job_encoder_dir(store.root, jid), store.model_dir(jid)):
        clean_stale_tmp(folder)  # temporary files of a commit killed before (dead processes' only)
    reg = r.register_fold or plans[0].name
    if reg not in results:
        raise HefeatError(f"register_fold {reg!r} is not a fold of this job ({', '.join(results)})")
    enc = export_encoder(store, jid, reg, r, data, results, precision)
    heads = enc.pop("heads")
    write_slide_predictions(store, jid, r.task, data.outputs, data.samples, oof, fold_of, tables["metrics"])
    history = pd.concat([pd.DataFrame(v["history"]).assign(fold=k) for k, v in results.items()], ignore_index=True)
    summary.update({"model_id": jid, "job_id": jid, "kind": f"finetune-{r.task}", "task": r.task,
                    "backbone": r.backbone, "weights": r.weights, "precision": precision, "folds": len(plans),
                    "epochs_run": int(history.groupby("fold")["epoch"].max().sum()),
                    "encoder": enc["encoder"], "register_fold": reg,
                    "images_per_s": _f(history["images_per_s"].median())})
    seconds = round(time.perf_counter() - t0, 3)
    save_model(store, jid, kind=f"finetune-{r.task}", params=r.to_dict(), summary=summary, arrays=heads,
               tables={**tables, "history": history}, seconds=seconds)
    _finish_record(store, jid, summary, enc, seconds)
    return {**model_summary(store, jid, cached=False), "job_id": jid}


def _finish_record(store, jid, summary, enc, seconds) -> None:
    """job.json (and its index record) as finished: written after the model's index record, the commit."""
    job = load_job(store, jid)
    job.update(status="finished", updated=timestamp(), summary=summary, encoder=enc, seconds=seconds)
    save_job(store, jid, job, fault_kind="job")


def _cached(store, jid, d: ddp.Dist) -> dict:
    """A job another process (or an earlier run) committed, returned as cached. Rank 0 holds the commit claim:
    when the committer was killed or ran out of disk between the model's index record and job.json, it
    completes job.json and its index record from what was committed (the model's summary and seconds, the
    encoder's record)."""
    from hefeat.learn.models import load_model, model_summary

    if not d.main:
        return {"job_id": jid, "rank": d.rank}
    if not job_finished(store, jid):
        meta = load_model(store, jid)
        enc = read_json(layout.job_encoder_dir(store.root, jid) / layout.ENCODER_META)
        _finish_record(store, jid, meta["summary"], enc, meta.get("seconds"))
    return {**model_summary(store, jid, cached=True), "job_id": jid}


def _f(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def write_slide_predictions(store, jid, task, outputs, samples, pred, fold_of, metrics, top: int = 20) -> None:
    """Per-slide predictions (tiles or spots; rows with a fold label) into predictions/model=<job_id>/.

    The task's prediction outputs (tasks.Task.prediction_outputs: regression, the `top` outputs by
    held-out metric, every output's head being in the model's arrays; classification, every output's
    probability), each a column named its prefix + output (p_<label>).
    """
    t = get_task(task)
    names = t.prediction_outputs(list(outputs), metrics, top)
    cols = [list(outputs).index(n) for n in names]
    keep = [c for c in ("tile_id", "spot_id", "x", "y", "row", "col") if c in samples.columns]
    tested = np.asarray(fold_of) != ""
    with write_predictions(store, jid) as write_pred:
        for sid, idx in samples[tested].groupby("slide_id", sort=True).groups.items():
            idx = np.asarray(idx)
            df = samples.loc[idx, keep].reset_index(drop=True)
            df = pd.concat([df, pd.DataFrame(pred[np.ix_(idx, cols)], columns=[t.prefix + n for n in names])], axis=1)
            df.insert(0, "fold", np.asarray(fold_of)[idx])
            df.insert(0, "slide_id", sid)
            df.insert(0, "model_id", jid)
            write_pred(sid, df)
