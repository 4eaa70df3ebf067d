"""Fine-tuning building blocks against hand computations: data order and sharding, augmentation,
checkpoints and RNG state, losses and target scaling, the EMO cost formula."""

from __future__ import annotations

import gc
import random

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.finetune.data import (
    FoldLoader,
    epoch_batches,
    eval_batches,
    micro_batch_size,
    shard_by_slide,
    steps_per_epoch,
)


def _slides(n_slides=5, per=7):
    return np.repeat(np.arange(n_slides), per)


def test_epoch_order_is_a_function_of_seed_epoch_and_rank():
    slide_of = _slides()
    train = np.arange(len(slide_of))
    kw = dict(global_batch=8, accumulate=2, steps=3, seed=4)
    a = epoch_batches(slide_of, train, epoch=0, rank=0, world=1, **kw)
    assert [len(b) for b in a] == [4] * 6  # 3 steps x 2 micro-batches of 8 / 2
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_batches(slide_of, train, epoch=0, rank=0, world=1, **kw),
                                                    strict=True))
    b = epoch_batches(slide_of, train, epoch=1, rank=0, world=1, **kw)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # A pass over the data: steps_per_epoch = ceil(n / global batch), every sample once.
    steps = steps_per_epoch(len(train), 5, None)
    full = np.concatenate(epoch_batches(slide_of, train, global_batch=5, accumulate=1, steps=steps, seed=0, epoch=0,
                                        rank=0, world=1))
    assert steps == 7 and sorted(full) == list(train)


def test_ddp_shards_are_whole_slides_disjoint_and_balanced():
    slide_of = np.array([0] * 10 + [1] * 2 + [2] * 3 + [3] * 9 + [4] * 1)
    train = np.arange(len(slide_of))
    for epoch in range(3):
        shards = shard_by_slide(slide_of, train, 2, seed=0, epoch=epoch)
        s0, s1 = (set(slide_of[s]) for s in shards)
        assert not s0 & s1 and s0 | s1 == {0, 1, 2, 3, 4}
        assert abs(len(shards[0]) - len(shards[1])) <= 4  # greedy by tile count
        per_rank = [epoch_batches(slide_of, train, global_batch=4, accumulate=1, steps=6, seed=0, epoch=epoch, rank=r,
                                  world=2) for r in (0, 1)]
        for r, batches in enumerate(per_rank):
            assert len(batches) == 6 and all(len(b) == 2 for b in batches)  # same step count on every rank
            assert set(slide_of[np.concatenate(batches)]) <= set(slide_of[shards[r]])
    with pytest.raises(HefeatError, match="cannot be sharded over 3 processes"):
        shard_by_slide(np.array([0, 0, 1]), np.arange(3), 3, seed=0, epoch=0)
    with pytest.raises(HefeatError, match="batch_size 10 must be divisible by accumulate x processes \\(4 x 1\\)"):
        micro_batch_size(10, 4, 1)
    ev = [eval_batches(slide_of, train, 4, rank=r, world=2) for r in (0, 1)]
    assert sorted(np.concatenate([np.concatenate(e) for e in ev])) == list(train)


def test_augmentations_replay_from_counters_and_match_their_definitions():
    import torch

    from hefeat.finetune.augment import Augmenter, counter_generator, dihedral_apply, hed_jitter

    x = torch.rand(6, 3, 8, 8) * 255
    k = torch.tensor([0, 1, 2, 3, 4, 7])
    out = dihedral_apply(x, k)
    for i, e in enumerate(k.tolist()):
        v = torch.flip(x[i:i + 1], dims=(3,)) if e >= 4 else x[i:i + 1]
        assert torch.equal(out[i:i + 1], torch.rot90(v, e % 4, dims=(2, 3)))
    same = hed_jitter(x, torch.ones(6, 3), torch.zeros(6, 3))
    torch.testing.assert_close(same, x, atol=1e-3, rtol=0)  # alpha 1, beta 0: the stain round trip is exact
    darker = hed_jitter(x, torch.full((6, 3), 1.3), torch.zeros(6, 3))
    assert float(darker.mean()) < float(x.mean())  # more stain absorbs more light
    mean, std = torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 64.0)
    aug = Augmenter(("dihedral", "hed", "brightness_contrast"), mean=mean, std=std)
    xn = (x - mean) / std
    a = aug(xn, counter_generator(0, 1, 2, 0, 0))
    b = aug(xn, counter_generator(0, 1, 2, 0, 0))
    c = aug(xn, counter_generator(0, 1, 3, 0, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_checkpoint_restores_every_rng_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    import torch

    from hefeat.finetune import checkpoint as ck

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ck.capture_rng()
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ck.save_checkpoint(tmp_path / "last.pt", {"rng": [state], "step": 1})
    torch.rand(5), np.random.rand(5), random.random()
    got = ck.load_checkpoint(tmp_path / "last.pt")  # weights_only: no code is unpickled
    ck.restore_rng(got["rng"][0])
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]

    def crash(name, step=None):
        if name == "ckpt-tmp":
            raise KeyboardInterrupt  # dies between writing the temporary file and the rename
    monkeypatch.setattr(ck, "fault_point", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "last.pt", {"rng": [state], "step": 2})
    assert ck.load_checkpoint(tmp_path / "last.pt")["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HefeatError, match="cannot be read"):
        ck.load_checkpoint(tmp_path / "bad.pt")
    assert ck.load_checkpoint(tmp_path / "none.pt") is None


def _data(kind="regression", T=None, units=None):
    from hefeat.finetune.targets import TaskData

    T = np.asarray(T, np.float32)
    n = len(T)
    units = np.arange(n) if units is None else np.asarray(units)
    return TaskData(samples=pd.DataFrame({"unit": units, "slide_id": "s", "patient_id": "p"}), train_targets=T,
                    outputs=[f"o{j}" for j in range(T.shape[1])], units=pd.DataFrame({"unit_id": np.unique(units)}),
                    unit_targets=T[np.unique(units, return_index=True)[1]].astype(float), kind=kind,
                    tiling={}, slides=pd.DataFrame(), variance_filter=True)


def test_targets_are_scaled_on_training_rows_and_losses_mask_missing_labels():
    import torch

    from hefeat.finetune.heads import activate, fold_targets, loss

    Y = np.array([[1.0, 5.0], [3.0, 5.001], [5.0, 5.0], [100.0, 0.0]])
    d = _data(T=Y)
    ft = fold_targets(d, np.array([0, 1, 2]), min_variance=0.01, standardize=True)
    np.testing.assert_allclose(ft.mean, [3.0, 5.000333], rtol=1e-6)
    assert ft.mask.tolist() == [True, False]  # gene 2 has no variance on the training rows (EMO's filter)
    out = torch.tensor([[0.5, 9.0]])
    np.testing.assert_allclose(activate("regression", out, ft)[0, 0], 3.0 + 0.5 * ft.std[0], rtol=1e-6)
    # Only kept outputs enter the loss: an absurd output for the dropped gene costs nothing.
    assert float(loss("regression", out, torch.tensor([[3.0 + 0.5 * float(ft.std[0]), 0.0]]), ft)) == pytest.approx(0, abs=1e-10)
    ftb = fold_targets(_data("binary", [[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), min_variance=0, standardize=True)
    logits = torch.tensor([[2.0, -50.0], [-1.0, 3.0]])
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([1.0, 0, 1]))
    assert float(loss("binary", logits, target, ftb)) == pytest.approx(float(ref))


def test_cost_ratio_matches_hand_computation():
    """EMO: 17,695 one-output networks vs one 17,695-output network (FLOPs of one forward pass)."""
    from hefeat.finetune.cost import cost_ratio, emo_cost

    f, d, g = 5.7e9, 2048, 17_695
    assert cost_ratio(int(f), d, g) == pytest.approx(g * (f + 2 * d) / (f + 2 * d * g))
    c = emo_cost(int(f), d, 100, images_per_s=10.0, images_per_network=36_000)
    assert c["this_network_device_hours"] == pytest.approx(1.0) and c["per_gene_device_hours"] == pytest.approx(
        c["cost_ratio_per_gene_vs_one_network"])
    assert 17_000 < c["cost_ratio_at_paper_genes"] < g  # the 17,695-wide head adds ~1 % to a 5.7 GFLOP backbone


class _PidSamples:
    """A dataset whose items say which process read them."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int):
        import os

        return os.getpid(), i


def test_fold_loader_workers_persist_across_epochs_and_serve_each_epochs_batches():
    """One worker process serves every epoch and validation pass, each with exactly its own batches
    (the old per-epoch DataLoader started a new worker each time)."""
    loader = FoldLoader(_PidSamples(), workers=1, pin=False, seed=0)
    try:
        seen, pids = [], set()
        for batches in ([np.array([3, 1]), np.array([7])], [np.array([9, 8, 2])], [np.array([5])]):
            got = list(loader.batches(batches))
            seen.append([b[1].tolist() for b in got])
            pids |= {int(p) for b in got for p in b[0]}
        assert seen == [[[3, 1], [7]], [[9, 8, 2]], [[5]]]
        assert len(pids) == 1
        it = loader.batches([np.array([1]), np.array([2]), np.array([3])])
        next(it)  # an epoch left unfinished (a stop) does not leak its batches into the next one
        assert [b[1].tolist() for b in loader.batches([np.array([4])])] == [[4]]
        assert gc.get_freeze_count() > 0  # what was alive at the fork stays out of the collector (hefeat.fork_gc)
    finally:
        loader.close()
    assert gc.get_freeze_count() == 0
    inline = FoldLoader(_PidSamples(), workers=0, pin=False, seed=0)
    assert [b[1].tolist() for b in inline.batches([np.array([6, 0])])] == [[6, 0]]
    assert gc.get_freeze_count() == 0  # no workers, nothing frozen


def test_no_task_ladder_in_finetune():
    """No module of finetune/ compares a task name with a string (`task == "spots"`, `r.task in (...)`): what
    differs between tasks is in their registrations (hefeat.finetune.tasks)."""
    import ast
    from pathlib import Path

    import hefeat.finetune

    def is_task(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "task") or (isinstance(node, ast.Attribute) and node.attr == "task")

    def is_str(node) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or \
            (isinstance(node, ast.Tuple | ast.List | ast.Set) and any(is_str(e) for e in node.elts))

    ladders = []
    for path in sorted(Path(hefeat.finetune.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(is_task(s) for s in sides) and any(is_str(s) for s in sides):
                    ladders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Subscript) and is_task(node.slice) and isinstance(node.value, ast.Dict):
                ladders.append(f"{path.name}:{node.lineno}")  # {"spots": f, ...}[r.task]
    assert ladders == []


def test_a_task_is_one_registration(tmp_path):
    """A toy task registered once is a valid recipe task, a `finetune-<task>` kind with its units and headline,
    and its predictions, comparison and report rows follow its registration."""
    from hefeat.finetune import methods, tasks
    from hefeat.finetune.job import write_slide_predictions
    from hefeat.finetune.recipe import recipe_from_dict
    from hefeat.finetune.report import headline
    from hefeat.learn.registry import get_method, output_units, unregister
    from hefeat.store.catalog import Store

    toy = tasks.Task(name="toy", summary="a toy", predicts="toy scores", load=lambda store, r: None,
                     evaluate=lambda *a, **k: ({}, {}), baseline=lambda *a, **k: None,
                     headline=lambda s: f"toy headline {s['x']}", units=lambda params, col: f"toy units of {col}",
                     output_col="thing", metric="score", metric_label="toy score", compare=("score", "n"),
                     prefix="t_")
    tasks.register_task(toy)
    try:
        assert recipe_from_dict({"task": "toy", "params": {"backbone": "test_convnext"}}).task == "toy"
        with pytest.raises(HefeatError, match="labels are for task classify; task toy predicts toy scores"):
            recipe_from_dict({"task": "toy", "params": {"backbone": "test_convnext", "labels": ["trait:A"]}})
        methods.register_method(toy)
        assert get_method("finetune-toy").headline({"x": 3}) == "toy headline 3" == headline({"kind": "finetune-toy",
                                                                                             "x": 3})
        assert output_units({"kind": "finetune-toy", "params": {}}, "t_a") == "toy units of t_a"
        fine = pd.DataFrame({"thing": ["a", "b", "c"], "score": [0.1, 0.9, 0.5], "n": [1, 2, 3]})
        frozen = fine.assign(score=[0.0, 0.5, 0.5])
        cmp = toy.compare_tables(fine, frozen)
        assert list(cmp["score_difference"]) == pytest.approx([0.1, 0.4, 0.0])
        rows = toy.comparison_rows(cmp)
        assert list(rows["name"][::2]) == ["b", "c", "a"] and set(rows["metric"]) == {"toy score"}
        st = Store.init(tmp_path / "st")
        samples = pd.DataFrame({"slide_id": ["s1", "s1", "s2"], "tile_id": [0, 1, 0], "x": 0, "y": 0})
        pred = np.arange(9, dtype=float).reshape(3, 3)
        write_slide_predictions(st, "ft-toy", "toy", ["a", "b", "c"], samples, pred,
                                np.array(["f1", "f1", "f2"], object), fine, top=2)
        df = pd.read_parquet(st.predictions_path("ft-toy", "s1"))
        assert [c for c in df.columns if c.startswith("t_")] == ["t_b", "t_c"]  # the 2 best by score, prefixed
        assert df["t_b"].tolist() == [1.0, 4.0]
    finally:
        tasks._TASKS.pop("toy", None)
        unregister("finetune-toy")


def test_training_calibration_times_the_jobs_micro_batch_on_a_gpu():
    """On a GPU the 2-16 sampled tiles are repeated to the job's micro-batch (a small step is launch-bound and
    cannot tell the precisions apart); on a CPU the sample is timed as it is."""
    import torch

    from hefeat.extract.precision import _batch
    from hefeat.finetune.job import calibration_batches

    assert calibration_batches("cuda:1", 64) == (64,) and calibration_batches("cuda", 8) == (8,)
    assert calibration_batches("cpu", 64) == (None,)
    x = torch.arange(5.0)[:, None]
    assert _batch(x, 64).shape == (64, 1) and torch.equal(_batch(x, 64)[5:10], x)
