"""Compaction of the per-slide families, checked structurally on a ~2,000-slide store (no timings).

Every check here failed on the main of 2026-11-21: tile-family members had become plain strings
while the plan's loose files were Paths, so `compact` never found a loose member, nothing was ever
compacted and every query re-planned (and re-ran) the failed compaction over 10,000 loose files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hefeat.store import compact, layout, records
from hefeat.store.catalog import Store

N_SLIDES = 2000


@pytest.fixture
def no_fsync(monkeypatch):
    """Durability is not what these tests are about: skip fsync so fabricating thousands of files is fast."""
    from hefeat.store import atomic

    monkeypatch.setattr(atomic, "fsync_file", lambda p: None)
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: None)
    monkeypatch.setattr(records, "fsync_dir", lambda p: None)


def _tiles_table(tid: str, sid: str, n: int):
    import pyarrow as pa

    i = np.arange(n, dtype=np.int64)
    return pa.table({"tiling_id": [tid] * n, "slide_id": [sid] * n, "tile_id": i, "x": i * 224, "y": i * 0,
                     "size0": np.full(n, 224.0), "sharpness": np.linspace(0, 1, n, dtype=np.float32)})


def _write(table, path: Path) -> None:
    import pyarrow.parquet as pq

    from hefeat.store.atomic import atomic_path

    with atomic_path(path, kind="tiles") as tmp:
        pq.write_table(table, tmp)


def tile_run(st: Store, tid: str, slide_ids: list[str], n_tiles=lambda i: 3 + i % 5, *, salt: int = 0) -> None:
    """Tile `slide_ids` through the per-slide runner (the writer path every tiling takes)."""
    from hefeat.runner import run_slides

    layout.tiling_dir(st.root, tid).mkdir(parents=True, exist_ok=True)

    def step(task):
        i = int(task.slide_id[1:])
        tbl = _tiles_table(tid, task.slide_id, n_tiles(i) + salt)
        _write(tbl, layout.tiles_path(st.root, tid, task.slide_id))
        return {"n_tiles": tbl.num_rows, "digest": f"d{i}-{salt}"}

    run_slides(st, "tiling", tid, slide_ids, step)


def write_predictions(st: Store, mid: str, slide_ids: list[str]) -> None:
    """Per-slide prediction files of one model, then the model's save (the writer that compacts them)."""
    import pyarrow as pa

    from hefeat.learn.models import save_model

    for sid in slide_ids:
        n = 2
        _write(pa.table({"slide_id": [sid] * n, "tile_id": np.arange(n), "pred": np.ones(n)}),
               layout.predictions_path(st.root, mid, sid))
    save_model(st, mid, kind="fabricated", params={}, summary={})


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 2,000-slide store: one tiling written by the runner in two runs, one model's predictions. Read-only."""
    from hefeat.store import atomic

    saved = atomic.fsync_file, atomic.fsync_dir, records.fsync_dir
    atomic.fsync_file = atomic.fsync_dir = records.fsync_dir = lambda p: None
    try:
        st = Store.init(tmp_path_factory.mktemp("big") / "st")
        ids = [f"S{i:05d}" for i in range(N_SLIDES)]
        tile_run(st, "tbig", ids[:1500])
        tile_run(st, "tbig", ids[1500:])  # a second worker's run: one more part, merged only when parts pile up
        write_predictions(st, "mbig", ids)
    finally:
        atomic.fsync_file, atomic.fsync_dir, records.fsync_dir = saved
    return st.root


def test_writers_leave_every_family_compacted(big):
    """After the runner and the model save commit, a fresh open plans no loose file in any family and
    reads no record file (all rows come from the compacted status table)."""
    st = Store(big)
    assert st.sql("SELECT count(*) FROM tiles").iloc[0, 0] == sum(3 + i % 5 for i in range(N_SLIDES))
    assert st.sql("SELECT count(*) FROM predictions").iloc[0, 0] == 2 * N_SLIDES
    assert set(st.plans) == {"tiles=tbig", "predictions=mbig"}
    for fam, pl in st.plans.items():
        assert pl.loose == [] and pl.exclude == [] and pl.broken == [], fam
        assert 1 <= len(pl.parts) <= compact.PARTS_MAX, fam
    snap = st.status_snapshot()  # the runner waited for its 2,000-record folder to settle: rows kept whole
    assert snap.reread == 0 and snap.rows_kept == N_SLIDES  # (no per-file stat, no JSON read)


def test_a_query_scans_the_compacted_parts_only(big):
    """Structural scale guard: the tiles view reads a few part files, and a one-slide filter is answered
    from them (DuckDB's plan lists the part files, never one of the 2,000 slide files)."""
    st = Store(big)
    got = st.sql("SELECT count(*) n, min(tile_id) a, max(tile_id) b FROM tiles WHERE slide_id = 'S01234'")
    assert got.iloc[0].tolist() == [3 + 1234 % 5, 0, 3 + 1234 % 5 - 1]
    plan = st.sql("EXPLAIN SELECT count(*) FROM tiles WHERE slide_id = 'S01234'").to_string()
    assert "slide=" not in plan
    sql = st.plans["tiles=tbig"].sql()
    assert sql.count(".parquet'") == len(st.plans["tiles=tbig"].parts) <= compact.PARTS_MAX


def test_reads_never_write_and_never_compact(big, monkeypatch, files_state):
    """status / sql through the CLI and the API leave every file of the store untouched; compaction is
    not even attempted by a reader."""
    from click.testing import CliRunner

    from hefeat.cli import main

    def refuse(*a, **k):
        raise AssertionError("a reader compacted")

    monkeypatch.setattr(compact, "compact", refuse)
    before = files_state(big)
    r = CliRunner().invoke(main, ["status", "--store", str(big), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["sql", "SELECT count(*) AS n FROM tiles", "--store", str(big), "--json"])
    assert r.exit_code == 0, r.output
    Store(big).sql("SELECT slide_id, count(*) FROM predictions GROUP BY 1")
    assert files_state(big) == before


def test_a_store_left_loose_is_read_whole_without_writing_and_compact_fixes_it(tmp_path, no_fsync, files_state):
    """Files a writer left uncompacted (a crash after its commits, an older hefeat) are planned around by
    readers, who write nothing; `hefeat compact` then leaves no loose file and the same rows."""
    from click.testing import CliRunner

    from hefeat.cli import main

    st = Store.init(tmp_path / "st")
    ids = [f"S{i:05d}" for i in range(300)]
    with monkeypatch_compaction_off():
        tile_run(st, "tl", ids)
        write_predictions(st, "ml", ids[:100])
    before = files_state(st.root)
    fresh = Store(st.root)
    n = fresh.sql("SELECT count(*) FROM tiles").iloc[0, 0]
    assert n == sum(3 + i % 5 for i in range(300))
    assert len(fresh.plans["tiles=tl"].loose) == 300 and len(fresh.plans["predictions=ml"].loose) == 100
    assert fresh.status_snapshot().reread == 300  # records read one by one: nothing compacted them
    assert files_state(st.root) == before
    r = CliRunner().invoke(main, ["compact", "--store", str(st.root), "--json"])
    assert r.exit_code == 0, r.output
    after = Store(st.root)
    assert after.sql("SELECT count(*) FROM tiles").iloc[0, 0] == n
    assert after.sql("SELECT count(*) FROM predictions").iloc[0, 0] == 200
    assert all(pl.compacted for pl in after.plans.values())
    assert after.status_snapshot().reread == 0


class monkeypatch_compaction_off:
    """Writers whose compaction step does not run (as if each process died right after its last commit)."""

    def __enter__(self):
        self.saved = Store.compact_after_write
        Store.compact_after_write = lambda self, stage, key: None

    def __exit__(self, *exc):
        Store.compact_after_write = self.saved


def test_many_runs_keep_parts_bounded_and_rewrite_the_big_part_rarely(tmp_path, no_fsync):
    """Twenty workers' runs of 10 slides each: parts stay <= PARTS_MAX, every row is there once, and the
    size-tiered merge leaves the largest part alone on most compactions."""
    st = Store.init(tmp_path / "st")
    ids = [f"S{i:05d}" for i in range(400)]
    tile_run(st, "tm", ids[:200])
    first = compact._manifest(st.root, "tiles=tm")["parts"][0]["file"]
    seen_first = 0
    for k in range(20):
        tile_run(st, "tm", ids[200 + 10 * k: 210 + 10 * k])
        man = compact._manifest(st.root, "tiles=tm")
        assert len(man["parts"]) <= compact.PARTS_MAX
        seen_first += first in {p["file"] for p in man["parts"]}
    assert seen_first == 20  # the 200-slide part was never rewritten
    fresh = Store(st.root)
    got = fresh.sql("SELECT count(*) n, count(DISTINCT slide_id) s FROM tiles").iloc[0].tolist()
    assert got == [sum(3 + i % 5 for i in range(400)), 400]
    assert fresh.plans["tiles=tm"].compacted


def test_retiled_slides_replace_their_rows_after_compaction(tmp_path, no_fsync):
    """A slide whose file changed is dropped from its old part; reads see the new rows before and after
    the next compaction, never both."""
    from hefeat.store import commit

    st = Store.init(tmp_path / "st")
    ids = [f"S{i:05d}" for i in range(50)]
    tile_run(st, "tr", ids)
    for sid in ids[:5]:  # their records go: the next run redoes them with other content
        layout.status_path(st.root, "tiling", "tr", sid).unlink()
    assert not commit.is_done(st, "tiling", "tr", ids[0])
    with monkeypatch_compaction_off():
        tile_run(st, "tr", ids[:5], salt=10)
    mid = Store(st.root)
    expect = sum(3 + i % 5 for i in range(50)) + 5 * 10
    assert mid.sql("SELECT count(*) FROM tiles").iloc[0, 0] == expect
    assert sorted(mid.plans["tiles=tr"].exclude) == ids[:5]
    st.compact()
    after = Store(st.root)
    assert after.sql("SELECT count(*) FROM tiles").iloc[0, 0] == expect
    assert after.plans["tiles=tr"].compacted


def test_slide_aggregates_read_without_writing_and_compact_consolidates(tmp_path, no_fsync, files_state):
    """An extraction whose consolidated slide table was never written (a worker died before it) is read
    from its files — right means, nothing written; `hefeat compact` then writes the table."""
    from hefeat.runner import run_slides
    from hefeat.store.atomic import write_json
    from hefeat.store.features import FeatureFileWriter, compact_store, slide_aggregates

    st = Store.init(tmp_path / "st")
    ids = [f"S{i:05d}" for i in range(12)]
    tile_run(st, "ta", ids)
    write_json(layout.extraction_meta_path(st.root, "ea"), {"extraction_id": "ea", "tiling_id": "ta", "dim": 4,
                                                              "dtype": "float32"})
    feats = {sid: np.random.default_rng(i).normal(size=(3 + i % 5, 4)).astype(np.float32) for i, sid in enumerate(ids)}

    def step(task):
        X = feats[task.slide_id]
        w = FeatureFileWriter(layout.features_path(st.root, "ea", task.slide_id), len(X), 4, dtype="float32",
                              coords=np.zeros((len(X), 2), np.int64), attrs={"tiling_id": "ta", "extraction_id": "ea"})
        w.write(0, X)
        w.commit()
        return {"n_tiles": len(X), "dim": 4, "digest": f"f{task.slide_id}"}

    run_slides(st, "extraction", "ea", ids, step)
    agg_file = st.aggregates_path("ea")
    assert not agg_file.exists()
    before = files_state(st.root)
    a = slide_aggregates(Store(st.root), "ea")
    np.testing.assert_allclose(a.mean, np.stack([feats[s].mean(0) for s in a.slide_ids]), rtol=1e-6)
    assert files_state(st.root) == before
    compact_store(st)
    assert agg_file.exists()
