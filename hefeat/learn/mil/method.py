"""The registered MIL methods (abmil, clam, transmil): the cross-validated fit, per-tile attention written as
predictions, `hefeat predict` with the mean of the fold models, the headline and units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.learn.mil.aggregators import build_net
from hefeat.learn.mil.data import (
    Targets,
    _aggregates,
    _bag_table,
    _targets,
    _tile_moments,
    mean_pooled,
)
from hefeat.learn.mil.evaluation import (
    PENALTIES,
    _baseline_scores,
    _metric_rows,
    baseline_tuning_rule,
    edge_note,
    fold_scaled_scores,
    fold_score_scale,
)
from hefeat.learn.mil.params import AbmilParams, ClamParams, MilParams, TransmilParams
from hefeat.learn.mil.training import _Fold, _infer
from hefeat.learn.registry import FitResult, Method, NotEstimable, register
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.predictions import write_predictions

SMALL_TEST = 10


def _state_arrays(k: int, net) -> dict:
    return {f"fold{k}:{name}": v.detach().cpu().numpy() for name, v in net.state_dict().items()}


def _load_nets(kind: str, meta: dict, p: MilParams) -> list:
    """The fold nets of a stored model with their regression scaling: [(net, mu, sd)]."""
    import torch

    s = meta["summary"]
    A = meta["arrays"]
    nets = []
    for k in range(int(s["n_folds"])):
        net = build_net(kind, int(s["dim"]), int(s["n_out"][k]), p, len(s.get("classes") or []))
        state = {name.split(":", 1)[1]: torch.from_numpy(v) for name, v in A.items() if name.startswith(f"fold{k}:")}
        net.load_state_dict(state)
        nets.append((net, float(s["scale"][k][0]), float(s["scale"][k][1])))
    return nets


def fit_mil(kind: str, store: Store, p: MilParams, model_id: str) -> FitResult:
    """Patient-grouped cross-validated attention MIL with early stopping, the mean-pool baseline, tile attention."""
    from hefeat.learn.bags import BagReader, make_bags, tile_sample
    from hefeat.learn.nets import derive_seed
    from hefeat.learn.splits import assert_disjoint, group_holdout, parse_split
    from hefeat.learn.threads import training_threads

    df, level = _bag_table(store, p)
    key = "patient_id" if level == "patient" else "slide_id"
    first = df.drop_duplicates(key).reset_index(drop=True)
    slides = [g["slide_id"].tolist() for _, g in df.groupby(key, sort=False)]
    tg = _targets(first, p)
    bags = make_bags(store, p.extraction_id, first[key].to_numpy(), first["patient_id"].to_numpy(), slides)
    patients = bags.patients
    folds = parse_split(p.split, bags.ids, patients, seed=p.seed)
    reader = BagReader(bags)

    def eval_rows(i: int) -> np.ndarray:
        return tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i]))

    n = len(bags)
    K = len(tg.classes)
    oof = np.full((n, K) if tg.task == "classification" else (n,), np.nan)
    fold_of = np.full(n, -1)
    tiles_out: dict[int, dict] = {}
    arrays, fold_rows, n_out, scale, notes, score_sd = {}, [], [], [], [], []
    d = bags.dim
    agg = _aggregates(store, p.extraction_id)
    flops = 6.0 * p.batch_size * p.max_tiles * d * p.hidden
    with training_threads(flops):
        for k, f in enumerate(folds):
            inner = group_holdout(patients[f.train], p.val_share, seed=derive_seed(p.seed, k, 1))
            tr, va = f.train[inner.train], f.train[inner.test]
            assert_disjoint(patients, tr, va, f.test)
            if tg.task == "classification":
                have = np.unique(tg.y[tr])
                if len(have) < K:
                    miss = [tg.classes[c] for c in range(K) if c not in have]
                    raise NotEstimable(f"{f.name}: its training patients hold no bag of class {', '.join(miss)} of "
                                       f"{p.label}; use fewer folds (--split patient-kfold:3), another --seed or more "
                                       "slides")
            if tg.task == "survival" and tg.event[tr].sum() == 0:
                raise NotEstimable(f"{f.name}: its training patients have no event in {p.event_col!r}; use fewer folds "
                                   "or more patients with events")
            fm = _Fold(kind, p, tg, d, tr, derive_seed(p.seed, k, 2), _tile_moments(agg, bags.slides, tr))
            info = fm.fit(reader, tr, va, derive_seed(p.seed, k, 3), eval_rows)
            nets = [(fm.net, fm.mu, fm.sd)]
            # Pooled into one metric, each fold's scores are first divided by their SD on the fold's training bags,
            # the baseline's rule (`fold_score_scale`): folds whose nets stopped at different confidence are
            # otherwise ranked against each other by that confidence, not by their bags.
            raw = "logits" if tg.task == "classification" else "score"
            zs = 1.0 if tg.task == "regression" else fold_score_scale(np.array(
                [_infer(nets, reader.read(int(i), eval_rows(int(i))), tg.task, p.survival_loss)[raw] for i in f.train]),
                tg.task)
            for i in f.test:
                r = _infer(nets, reader.read(int(i), eval_rows(int(i))), tg.task, p.survival_loss)
                oof[i] = fold_scaled_scores(r[raw], zs, tg.task)
                fold_of[i] = k
                tiles_out[int(i)] = r
            arrays.update(_state_arrays(k, fm.net))
            n_out.append(int(fm.net.head.out_features))
            scale.append([fm.mu, fm.sd])
            score_sd.append(zs)
            fold_rows.append({"fold": f.name, "n_train": len(tr), "n_validation": len(va), "n_test": len(f.test),
                              "best_epoch": info["best_epoch"], "best_val_loss": info["best_val_loss"],
                              "epochs_run": len(info["history"]),
                              "cuts": ",".join(f"{c:g}" for c in fm.cuts)})
            for h in info["history"]:
                fold_rows.append({"fold": f.name, **h, "history": True})
    tested = np.flatnonzero(fold_of >= 0)
    metrics = _metric_rows(tg, tested, oof[tested], patients, p, kind)
    base = None
    if p.baseline:
        Xm = mean_pooled(store, p.extraction_id, bags.slides)
        base, chosen = _baseline_scores(Xm, tg, folds, p, patients)
        metrics += _metric_rows(tg, tested, base[tested], patients, p, "mean-pool baseline")
        for r in fold_rows:  # each fold's chosen penalty next to its MIL training record
            c = next(c for c in chosen if c["fold"] == r["fold"])
            if not r.get("history"):
                r[f"baseline_{c['penalty']}"], r["baseline_inner_folds"] = c["value"], c["inner_folds"]
                r["baseline_penalty_edge"] = c["edge"]
    metrics = pd.DataFrame(metrics)
    main_metric = {"classification": "auc", "regression": "pearson_r", "survival": "c_index"}[tg.task]
    mine = metrics[(metrics["model"] == kind) & (metrics["metric"] == main_metric)].iloc[0]
    if not np.isfinite(mine["value"]):
        raise NotEstimable(f"The held-out bags give no {main_metric} ({len(tested)} bags; e.g. one class only or no "
                           "event); use fewer folds or more slides")
    summary = {"extraction_id": p.extraction_id, "aggregator": kind, "task": tg.task,
               "target": p.label if tg.task != "survival" else f"{p.time_col}/{p.event_col}",
               "level": level, "n_bags": n, "n_patients": int(len(np.unique(patients))),
               "n_tested": int(len(tested)), "split": f"{p.split} seed={p.seed}", "n_folds": len(folds),
               "metric": main_metric, "value": float(mine["value"]), "ci_low": float(mine["ci_low"]),
               "ci_high": float(mine["ci_high"]), "ci_level": p.ci_level, "dim": d, "n_out": n_out, "scale": scale,
               "classes": tg.classes,
               "tiles": f"training: random {p.max_tiles} tiles per bag per epoch (seeded by seed, fold, epoch); "
                        f"evaluation: all tiles up to {p.eval_max_tiles} (fixed seeded sample beyond)",
               "n_tiles_total": int(bags.n_tiles.sum()), "max_bag_tiles": int(bags.n_tiles.max()),
               "fold_score_sd": score_sd,
               "pooling": "each fold's held-out " + {"classification": "logits (probabilities = softmax(logits / sd))",
                                                      "survival": "risks", "regression": "predictions"}[tg.task]
                          + (" in the target's units" if tg.task == "regression" else
                             " divided by their SD on the fold's training bags (fold_score_sd), as the baseline's")
                          + ", then pooled into one metric"}
    if base is not None:
        b = metrics[(metrics["model"] == "mean-pool baseline") & (metrics["metric"] == main_metric)].iloc[0]
        summary.update({"baseline_value": float(b["value"]), "baseline_ci_low": float(b["ci_low"]),
                        "baseline_ci_high": float(b["ci_high"]), "baseline_model": baseline_tuning_rule(tg.task),
                        "baseline_penalty": PENALTIES[tg.task],
                        "baseline_penalties": {c["fold"]: c["value"] for c in chosen},
                        "baseline_penalty_at_edge": {c["fold"]: c["edge"] for c in chosen if c["edge"]}})
        if (line := edge_note(chosen, tg.task)) is not None:
            notes.append(line)
    if len(np.unique(patients[tested])) < SMALL_TEST:
        notes.append(f"{main_metric} from {len(np.unique(patients[tested]))} held-out patients: the bootstrap CI of so "
                     "few patients is unreliable; add patients")
    scores = _score_table(bags, tg, oof, base, fold_of, [f.name for f in folds])
    _write_tiles(store, model_id, p, bags, reader, tiles_out, fold_of, [f.name for f in folds], eval_rows)
    return FitResult(summary=summary, arrays=arrays, extraction_id=p.extraction_id, notes=notes,
                     tables={"metrics": metrics, "patient_scores": scores, "folds": pd.DataFrame(fold_rows)})


def _score_table(bags, tg: Targets, oof, base, fold_of, fold_names) -> pd.DataFrame:
    df = pd.DataFrame({"bag_id": bags.ids, "patient_id": bags.patients, "slides": [",".join(s) for s in bags.slides],
                       "n_tiles": bags.n_tiles, "fold": [fold_names[k] if k >= 0 else None for k in fold_of]})
    if tg.task == "classification":
        df["y"] = [tg.classes[c] for c in tg.y]
        for c, name in enumerate(tg.classes):
            df[f"p_{name}"] = oof[:, c]
            if base is not None:
                df[f"baseline_p_{name}"] = base[:, c]
    else:
        if tg.task == "regression":
            df["y"] = tg.y
        else:
            df["time"], df["event"] = tg.time, tg.event
        df["score"] = oof
        if base is not None:
            df["baseline_score"] = base
    return df


def _write_tiles(store: Store, mid: str, p: MilParams, bags, reader, tiles_out: dict, fold_of, fold_names,
                 eval_rows) -> None:
    """Per-tile predictions (attention, its bag-size-scaled form, tile score) of each bag's held-out model."""
    from hefeat.store.features import read_slide_coords

    with write_predictions(store, mid) as write_pred:
        for i, r in tiles_out.items():
            rows = eval_rows(i)
            files = bags.files[i]
            att = np.full(int(bags.n_tiles[i]), np.nan)
            att[rows] = r["attention"]
            tile = None
            if "tile" in r and r["tile"].ndim == 1:
                tile = np.full(len(att), np.nan)
                tile[rows] = r["tile"]
            start = 0
            for f in files:
                xy = read_slide_coords(f)
                sl = slice(start, start + f.n)
                df = pd.DataFrame({"model_id": mid, "slide_id": f.slide_id, "tile_id": np.arange(f.n, dtype=np.int64),
                                   "x": xy[:, 0], "y": xy[:, 1], "attention": att[sl],
                                   "attention_scaled": att[sl] * len(rows)})
                if tile is not None:
                    df["tile_score"] = tile[sl]
                df["bag_id"] = bags.ids[i]
                df["fold"] = fold_names[fold_of[i]]
                write_pred(f.slide_id, df)
                start += f.n


# ----------------------------------------------------------------------------------------------
# Predict, headline, registration
# ----------------------------------------------------------------------------------------------
def predict_mil(kind: str, store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Score slides (default: every finished slide of the model's extraction) with the mean of the fold models.

    Each slide is its own bag here; its tiles' attention and scores are written as its predictions,
    and the slide scores to models/<id>/slide_predictions.parquet.
    """
    from hefeat.learn.bags import make_bags, tile_sample
    from hefeat.learn.data import finished_slides
    from hefeat.learn.models import load_model
    from hefeat.learn.registry import make_params
    from hefeat.store.tables import write_parquet

    meta = load_model(store, mid)
    cls = {"abmil": AbmilParams, "clam": ClamParams, "transmil": TransmilParams}[kind]
    p = make_params(cls, meta["params"])
    s = meta["summary"]
    nets = _load_nets(kind, meta, p)
    eid = meta["extraction_id"]
    sids = list(slides) if slides else finished_slides(store, eid)
    bags = make_bags(store, eid, np.array(sids), np.array(sids), [[x] for x in sids])
    from hefeat.learn.bags import BagReader

    reader = BagReader(bags, cache_bytes=0)
    out_rows, tiles_out = [], {}
    for i, sid in enumerate(sids):
        rows = tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i]))
        r = _infer(nets, reader.read(i, rows), s["task"], p.survival_loss)
        tiles_out[i] = r
        row = {"slide_id": sid, "n_tiles": int(bags.n_tiles[i])}
        if s["task"] == "classification":
            row.update({f"p_{c}": float(v) for c, v in zip(s["classes"], r["score"], strict=True)})
        else:
            row["score"] = float(np.ravel(r["score"])[0])
        out_rows.append(row)
    _write_tiles(store, mid, p, bags, reader, tiles_out, np.zeros(len(sids), int), ["ensemble"],
                 lambda i: tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i])))
    write_parquet(pd.DataFrame(out_rows), layout.model_table_path(store.root, mid, "slide_predictions"))
    return {"model_id": mid, "slides": len(sids), "tiles": int(bags.n_tiles.sum()),
            "slide_value": f"mean of {s['n_folds']} fold models; tile attention per slide"}


def headline(s: dict) -> str:
    """The main held-out metric with its CI, next to the mean-pool baseline on the same folds."""
    lvl = f"{s.get('ci_level', 0.95):.0%}"
    txt = (f"{s['target']} ({s['task']}, {s['aggregator']}): held-out {s['metric']} {s['value']:.3f} "
           f"({lvl} CI {s['ci_low']:.3f}-{s['ci_high']:.3f}) on {s['n_tested']} {s['level']} bags")
    if "baseline_value" in s:
        txt += f"; mean-pool baseline {s['baseline_value']:.3f} ({s['baseline_ci_low']:.3f}-{s['baseline_ci_high']:.3f})"
    return txt


def _units(params: dict, col: str) -> str:
    return {"attention": "attention weight (share of the bag)", "attention_scaled": "attention x tiles in bag (1 = uniform)",
            "tile_score": "per-tile head output (logit / risk / value)"}.get(col, "model output")


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    return []


_EX = "hefeat fit {n} --extraction e1234 --label focal_status --split patient-kfold:5"
for _kind, _cls, _prefix, _summary in (
    ("abmil", AbmilParams, "abm-", "Gated-attention MIL (Ilse et al. 2018): slide/patient labels, survival, regression."),
    ("clam", ClamParams, "clm-", "CLAM-SB single-branch attention MIL with optional instance clustering (Lu et al. 2021)."),
    ("transmil", TransmilParams, "tml-", "Small TransMIL-style transformer aggregator over tiles (Shao et al. 2021)."),
):
    register(Method(
        name=_kind, prefix=_prefix, params=_cls,
        fit=(lambda k: lambda store, p, mid: fit_mil(k, store, p, mid))(_kind),
        predict=(lambda k: lambda store, mid, *, slides=None, top=20: predict_mil(k, store, mid, slides=slides, top=top))(_kind),
        headline=headline, plots=_plots, units=_units, summary=_summary, example=_EX.format(n=_kind),
    ))
