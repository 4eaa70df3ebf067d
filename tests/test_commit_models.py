"""Fits, predicts and fine-tuning jobs under fault injection: readers see the old state or the new one.

A forked child SIGKILLs itself at one named step of the commit (hefeat.store.faults), or runs out of disk
(ENOSPC) there; the children are forked where the commit starts (conftest._crash_children), so the fit or
predict before it runs once per test, not once per crash. After each crash the store must list no model
whose predictions are missing, the predictions view must hold the old slides or the new ones (never
a mix), and a re-run must finish with the uninterrupted result.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from hefeat.learn import emo, traits
from hefeat.store import faults, layout
from hefeat.store.catalog import Store
from hefeat.store.models import discard_model
from hefeat.store.summary import store_status

FIT_POINTS = ("predictions.write@2", "predictions.rename@2", "predictions.swap", "predictions.swapped",
              "model.table.write", "model.table.rename", "model.meta.write", "model.meta.rename",
              "model.index.write", "model.index.rename")
FIRST_PREDICT_POINTS = ("predictions.write@3", "predictions.rename@3", "predictions.table.write",
                        "predictions.table.rename", "predictions.table.link", "predictions.swap", "predictions.swapped")
PREDICT_POINTS = ("predictions.write@3", "predictions.rename@3", "predictions.table.write", "predictions.table.rename",
                  "predictions.carry", "predictions.swap", "predictions.swapped")  # the swap is the commit: last


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    faults.disarm()


@pytest.fixture
def st40(learned_base, tmp_path):
    """A writable copy of the 40-slide store without its models, and its extraction."""
    st0, eid, _, _ = learned_base
    root = tmp_path / "st"
    shutil.copytree(st0.root, root, ignore=shutil.ignore_patterns("models", "predictions"))
    return Store(root), eid


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


def test_fit_crash_at_every_commit_step_never_lists_a_model_with_missing_predictions(st40, crash_children):
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
    tried = []

    def check(spec, action, code):
        assert code == {"kill": -9, "enospc": 3}[action], (spec, action)
        assert _visible(st.root) == ({}, {}), (spec, action)  # nothing half: no model, no predictions
        tried.append((spec, action))

    # One fit up to its commit (the predictions' writer); each crash in a forked child that first discards the
    # interrupted fit's leftovers, as fit_model does before fitting, then commits with the fault armed.
    crashes = [(spec, action) for spec in FIT_POINTS for action in ("kill", "enospc")]
    crash_children(lambda: _fit_traits(st.root, eid), traits, "write_predictions", crashes, check,
                   before=lambda: discard_model(Store(st.root), mid))
    assert tried == crashes
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


def test_predict_crash_at_every_commit_step_leaves_the_old_predictions_or_the_new(st40, crash_children):
    """A model's first predict (3 genes on 5 slides), killed and out of disk at each step of its commit: readers
    see no predictions of it until the swap and all 5 slides after, `hefeat status` lists it (as before the
    predict) and never with part of its predictions, and a re-run completes it. Then a re-predict with 5 genes on
    12 slides (those 5 and 7 more), killed / out of disk at each step: before the swap the 5 slides show the
    3-gene predictions, after it all 12 show the 5-gene ones (never a mix), and the slide_predictions table
    always lists exactly the predicted slides (it was written after the swap: a crash there left 12 slides of
    tiles with the 5-slide table, or none on a first predict); the re-run gives 5 everywhere. Each crash runs in
    a child forked where the predict starts writing (conftest._crash_children)."""
    from hefeat.learn.emo import GenesParams
    from hefeat.learn.registry import fit_model, predict_model

    st, eid = st40
    mid = fit_model(st, "genes", GenesParams(extraction_id=eid, split="patient-kfold:3"))["model_id"]
    every = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])
    first, more = every[:5], every[:12]  # few: each crash's child writes them all

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
        assert sorted(seen[mid]) == {0: first, 2: more}[state] and set(old[mid]) <= set(seen[mid]), spec
        return state

    tried = []

    def crashed(old, committed_at):
        def check_child(spec, action, code):
            assert code == {"kill": -9, "enospc": 3}[action], (spec, action)
            want = (len(first) if old is None else 2) if spec == committed_at else 0
            assert check(f"{spec}:{action}", old) == want, (spec, action)
            tried.append((spec, action))
        return check_child

    # First predict: the swap is the commit; out of disk after it the predictions are in, as after a kill there,
    # so the full disk is tried at every step before it and the kill at the swap's end comes last.
    crashes = [(spec, action) for spec in FIRST_PREDICT_POINTS[:-1] for action in ("kill", "enospc")] + \
        [(FIRST_PREDICT_POINTS[-1], "kill")]
    ref_root = st.root.parent / "ref"
    shutil.copytree(st.root, ref_root)
    reached, _ = _reached(lambda: predict_model(Store(ref_root), mid, top=3, slides=first))  # an uninterrupted one
    assert _steps(reached) == {spec.partition("@")[0] for spec in FIRST_PREDICT_POINTS}  # every step is tried
    crash_children(predict(3, first), emo, "write_predictions", crashes, crashed(None, "predictions.swapped"))
    assert tried == crashes
    predict(3, first)()  # the re-run completes it
    assert _visible(st.root) == _visible(ref_root)
    models, old = _visible(st.root)
    assert sorted(old[mid]) == first == _slide_table(st.root, mid) and len(set(old[mid].values())) == 1

    tried.clear()
    crashes = [(spec, action) for spec in PREDICT_POINTS for action in ("kill", "enospc")]
    crash_children(predict(5, more), emo, "write_predictions", crashes, crashed(old, "predictions.swapped"))
    assert tried == crashes
    reached, _ = _reached(predict(5, more))
    assert check("re-run", old) == 2 and _slide_table(st.root, mid) == more
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


def test_a_model_stored_before_records_v3_opens_with_status_predict_and_report(st40):
    """A genes model as the code before records v3 stored it (conftest.PRE_V3: the old id formula, a plain
    predictions folder and slide_predictions table): `hefeat status` lists it, `hefeat report` reports it, and
    `hefeat predict` on two more slides keeps its three earlier ones (the plain folder and table are carried into
    the predictions generations). Fitting the same model again makes the current id once (README: ids changed)."""
    import json

    from click.testing import CliRunner
    from conftest import as_pre_v3

    from hefeat.cli import main
    from hefeat.learn.emo import GenesParams
    from hefeat.learn.registry import fit_model, predict_model

    st, eid = st40
    params = GenesParams(extraction_id=eid, split="patient-kfold:3")
    mid = fit_model(st, "genes", params)["model_id"]
    slides = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])[:5]
    predict_model(st, mid, top=3, slides=slides[:3])
    old = as_pre_v3(st.root, mid)
    assert not layout.predictions_dir(st.root, old).is_symlink()  # the old layout: a plain folder
    assert not layout.model_table_path(st.root, old, "slide_predictions").is_symlink()
    cli = CliRunner()

    def run(*args):
        r = cli.invoke(main, [*args, "--store", str(st.root), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    assert run("status")["models"] == [{"model_id": old, "kind": "genes", "extraction_id": eid}]
    assert _visible(st.root)[1][old].keys() == set(slides[:3])
    rep = run("report", old)
    assert rep["files"] and all(os.path.exists(f) for f in rep["files"])
    run("predict", old, "--slides", f"{slides[3]},{slides[4]}", "--top", "3")
    models, seen = _visible(st.root)
    assert models == {old: "genes"} and sorted(seen[old]) == slides and _slide_table(st.root, old) == slides
    assert layout.predictions_dir(st.root, old).is_symlink()  # now in the generations
    again = fit_model(Store(st.root), "genes", params)
    assert again["model_id"] == mid != old and not again["cached"]
