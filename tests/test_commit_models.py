"""Fits, predicts and fine-tuning jobs under fault injection: readers see the old state or the new one.

A forked child SIGKILLs itself at one named step of the commit (hefeat.store.faults); a full disk
(ENOSPC) is raised in-process at the same steps. After each crash the store must list no model
whose predictions are missing, the predictions view must hold the old slides or the new ones (never
a mix), and a re-run must finish with the uninterrupted result.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from hefeat.store import faults, layout
from hefeat.store.catalog import Store
from hefeat.store.summary import store_status

FIT_POINTS = ("predictions.write@2", "predictions.rename@2", "predictions.swap", "predictions.swapped",
              "model.table.write", "model.table.rename", "model.meta.write", "model.meta.rename",
              "model.index.write", "model.index.rename")
PREDICT_POINTS = ("predictions.write@3", "predictions.rename@3", "predictions.table.write", "predictions.table.rename",
                  "predictions.carry", "predictions.swap", "predictions.swapped")  # the swap is the commit: last


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    faults.disarm()


@pytest.fixture
def st40(learned, tmp_path):
    """A writable copy of the 40-slide store without its models, and its extraction."""
    st0, eid, _, _ = learned
    root = tmp_path / "st"
    shutil.copytree(st0.root, root, ignore=shutil.ignore_patterns("models", "predictions"))
    return Store(root), eid


def _arm(spec: str, action: str) -> None:
    name, _, nth = spec.partition("@")
    faults.arm(name, action, int(nth or 1))


def _killed(fn, spec: str) -> int:
    """Run fn() in a forked child that SIGKILLs itself at fault point `spec`; its exit code."""
    def child():
        _arm(spec, "kill")
        fn()
        os._exit(0)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(600)
    return p.exitcode


def _reached(fn) -> tuple[list[str], object]:
    """(the fault points fn() passes, in order; its result), with no fault armed."""
    seen, real = [], faults.point

    def record(name: str) -> None:
        seen.append(name)
        real(name)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(faults, "point", record)
        out = fn()
    return seen, out


def _steps(reached: list[str]) -> set[str]:
    """The distinct commit steps among fault points: a file's '.fsync' leaves what its '.rename' does (the temporary
    file written, not renamed) and its '.renamed' what the next step does (or, after the last, the whole commit).
    Compaction (compact.*) runs after the commit and only saves readers time: a failure there is a warning."""
    out = set()
    for name in reached:
        kind, _, step = name.rpartition(".")
        if step == "renamed" or kind == "compact":
            continue
        out.add(f"{kind}.rename" if step == "fsync" else name)
    return out


def _visible(root) -> tuple[dict, dict]:
    """What a fresh reader sees: {model_id: kind} listed by `hefeat status`, {model_id: {slide: columns}}."""
    st = Store(root)
    models = {m["model_id"]: m["kind"] for m in store_status(st)["models"]}
    rows = st.sql("SELECT model_id, slide_id, count(*) n FROM predictions GROUP BY ALL")
    cols = {}
    for mid, sid in zip(rows["model_id"], rows["slide_id"], strict=True):
        cols.setdefault(mid, {})[sid] = tuple(pq.read_schema(layout.predictions_path(st.root, mid, sid)).names)
    return models, cols


def _fit_traits(root, eid):
    from hefeat.learn.registry import fit_model
    from hefeat.learn.traits import TraitsParams

    return fit_model(Store(root), "traits", TraitsParams(extraction_id=eid, exclude_mid=[30, 70], test_share=0.2,
                                                         splits=2, ensemble=1, max_tiles_per_slide=50))


def test_fit_crash_at_every_commit_step_never_lists_a_model_with_missing_predictions(st40):
    """Killed or out of disk at each step of a fit's commit: no model listed and no predictions visible
    (or, after the index record, the whole model); a re-run fits it and equals an uninterrupted fit."""
    st, eid = st40
    ref_root = st.root.parent / "ref"
    shutil.copytree(st.root, ref_root)
    reached, ref = _reached(lambda: _fit_traits(ref_root, eid))
    assert _steps(reached) == {spec.partition("@")[0] for spec in FIT_POINTS}  # every step of the commit is tried
    mid = ref["model_id"]
    ref_models, ref_cols = _visible(ref_root)
    assert ref_models == {mid: "traits"} and len(ref_cols[mid]) == ref["n_slides"]
    for spec in FIT_POINTS:
        assert _killed(lambda: _fit_traits(st.root, eid), spec) == -9, spec
        assert _visible(st.root) == ({}, {}), spec  # nothing half: no model, no predictions
        _arm(spec, "enospc")
        with pytest.raises(OSError, match="No space"):
            _fit_traits(st.root, eid)
        faults.disarm()
        assert _visible(st.root) == ({}, {}), spec
    got = _fit_traits(st.root, eid)
    assert got["model_id"] == mid and not got["cached"]
    assert _visible(st.root) == (ref_models, ref_cols)
    a = Store(ref_root).sql(f"SELECT * EXCLUDE (model_id) FROM predictions WHERE model_id = '{mid}' ORDER BY ALL")
    b = Store(st.root).sql(f"SELECT * EXCLUDE (model_id) FROM predictions WHERE model_id = '{mid}' ORDER BY ALL")
    pd.testing.assert_frame_equal(a, b)
    gens = layout.predictions_generations(st.root, mid)
    assert [p.name for p in gens.iterdir()] == [os.path.basename(os.readlink(layout.predictions_dir(st.root, mid)))]


def _slide_table(root, mid) -> list[str]:
    """Slides of a model's slide_predictions table as a reader sees it ([] when there is none)."""
    p = layout.model_table_path(root, mid, "slide_predictions")
    return sorted(pd.read_parquet(p)["slide_id"]) if p.exists() else []


def test_predict_crash_at_every_commit_step_leaves_the_old_predictions_or_the_new(st40):
    """A model predicted with 3 genes on 20 slides, then re-predicted with 5 on all 40 and killed / out of disk at
    each step: before the swap the 20 slides show the 3-gene predictions, after it all 40 the 5-gene ones (never a
    mix), and the slide_predictions table always lists exactly the predicted slides (it was written after the
    swap: a crash there left 40 slides of tiles with the 20-slide table, or none on a first predict); the re-run
    gives 5 everywhere."""
    from hefeat.learn.emo import GenesParams
    from hefeat.learn.registry import fit_model, predict_model

    st, eid = st40
    mid = fit_model(st, "genes", GenesParams(extraction_id=eid, split="patient-kfold:3"))["model_id"]
    first = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])[:20]

    def predict(top, slides):
        return lambda: predict_model(Store(st.root), mid, top=top, slides=slides)

    def check(spec, old):
        seen_models, seen = _visible(st.root)
        assert mid in seen_models, spec
        assert _slide_table(st.root, mid) == sorted(seen.get(mid, {})), spec  # the table goes with the tiles
        if old is None:  # first predict: none or all
            return 0 if mid not in seen else len(seen[mid])
        widths = {len(c) for c in seen[mid].values()}
        assert len(widths) == 1, spec  # never some slides old and some new
        state = widths.pop() - len(next(iter(old[mid].values())))  # 0: old state, 2: new state
        assert len(seen[mid]) == {0: 20, 2: 40}[state] and set(old[mid]) <= set(seen[mid]), spec
        return state

    for spec in ("predictions.table.write", "predictions.table.link", "predictions.swap", "predictions.swapped"):
        assert _killed(predict(3, first), spec) == -9, spec
        assert check(spec, None) == (20 if spec == "predictions.swapped" else 0), spec
    predict(3, first)()
    models, old = _visible(st.root)
    assert sorted(old[mid]) == first == _slide_table(st.root, mid) and len(set(old[mid].values())) == 1

    for spec in PREDICT_POINTS:
        assert _killed(predict(5, None), spec) == -9, spec
        assert check(spec, old) == (2 if spec == "predictions.swapped" else 0), spec  # the swap is the commit
        _arm(spec, "enospc")
        with pytest.raises(OSError, match="No space"):
            predict(5, None)()
        faults.disarm()
        assert check(spec, old) == (2 if spec == "predictions.swapped" else 0), spec
    reached, _ = _reached(predict(5, None))
    assert check("re-run", old) == 2 and len(_slide_table(st.root, mid)) == 40
    assert _steps(reached) == {spec.partition("@")[0] for spec in PREDICT_POINTS}  # every step of the commit was tried


def test_legacy_predictions_folder_is_carried_into_a_generation(st40):
    """A store written before generations (a plain predictions folder) keeps its slides on the next write."""
    from hefeat.store.predictions import write_predictions

    st, _ = st40
    plain = layout.predictions_dir(st.root, "m-legacy")
    plain.mkdir(parents=True)
    pd.DataFrame({"model_id": ["m-legacy"], "slide_id": ["S01"], "v": [1.0]}).to_parquet(
        layout.predictions_file_in(plain, "S01"))
    with write_predictions(st, "m-legacy") as write:
        write("S02", pd.DataFrame({"model_id": ["m-legacy"], "slide_id": ["S02"], "v": [2.0]}))
    assert plain.is_symlink()
    assert sorted(p.name for p in plain.iterdir()) == ["slide=S01.parquet", "slide=S02.parquet"]


def test_plain_slide_table_moves_into_the_generations_and_keeps_its_other_slides(st40):
    """A slide_predictions table written in models/<mid>/ (before it moved into the predictions generation) stays
    readable, and a predict on one slide replaces that slide's row and keeps the others."""
    from hefeat.store.predictions import write_predictions

    st, _ = st40
    table = layout.model_table_path(st.root, "m-plain", "slide_predictions")
    table.parent.mkdir(parents=True)
    with write_predictions(st, "m-plain") as write:
        write("S01", pd.DataFrame({"model_id": ["m-plain"], "slide_id": ["S01"], "v": [1.0]}))
    pd.DataFrame({"slide_id": ["S01", "S02"], "g": [1.0, 2.0]}).to_parquet(table)  # as the old code left it
    with write_predictions(st, "m-plain") as write:
        write("S02", pd.DataFrame({"model_id": ["m-plain"], "slide_id": ["S02"], "v": [2.0]}))
        write.table("slide_predictions", pd.DataFrame({"slide_id": ["S02", "S03"], "g": [20.0, 30.0]}))
    assert table.is_symlink()
    got = pd.read_parquet(table)
    assert got.to_dict("list") == {"slide_id": ["S01", "S02", "S03"], "g": [1.0, 20.0, 30.0]}
