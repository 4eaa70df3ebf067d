"""Feature reads: slide aggregates, tiling-checked loads, fp16 and streaming, raw reads vs h5py."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.store.atomic import write_json
from hefeat.store.catalog import Store
from hefeat.store.commit import commit_ok
from hefeat.store.features import (
    FeatureFileWriter,
    feature_offsets,
    half_to_float,
    iter_features,
    iter_slide_features,
    load_features,
    read_features,
    read_global_rows,
    refresh_aggregates,
    slide_aggregates,
    slide_means,
    slide_table,
)
from hefeat.store.tables import write_parquet

DIM = 16


def _features(seed: int, n: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, DIM)) * 3 + g.normal(size=DIM) * 5).astype(np.float32)


def _write_slide(st: Store, eid: str, tid: str, sid: str, X: np.ndarray, dtype: str = "float16", batch: int = 7) -> None:
    w = FeatureFileWriter(st.features_path(eid, sid), len(X), DIM, dtype=dtype, coords=np.c_[np.arange(len(X)) * 10, np.zeros(len(X))],
                          attrs={"tiling_id": tid, "extraction_id": eid, "slide_id": sid})
    for a in range(0, len(X), batch):
        w.write(a, X[a:a + batch])
    w.commit()
    commit_ok(st, "extraction", eid, sid, n_tiles=len(X), seconds=0.0, digest=None)  # the slide becomes visible


def _write_tiles(st: Store, tid: str, sid: str, n: int) -> None:
    write_parquet(pd.DataFrame({"tiling_id": tid, "slide_id": sid, "tile_id": np.arange(n, dtype=np.int64),
                                "x": np.arange(n, dtype=np.int64) * 10, "y": np.zeros(n, np.int64),
                                "sharpness": np.arange(n, dtype=np.float32)}), st.tiles_path(tid, sid))
    commit_ok(st, "tiling", tid, sid, n_tiles=n, seconds=0.0, digest=None)  # the slide becomes visible


def _store(tmp_path, counts: dict[str, int], *, other_tiling: dict[str, int] | None = None, dtype: str = "float16"):
    """A store with tiling t1 (+ optionally t2 with other tile counts) and extraction e1 on t1."""
    st = Store.init(tmp_path / "st")
    write_json(st.extraction_dir("e1") / "_extraction.json", {"extraction_id": "e1", "tiling_id": "t1", "dim": DIM})
    X = {}
    for i, (sid, n) in enumerate(counts.items()):
        _write_tiles(st, "t1", sid, n)
        X[sid] = _features(i, n)
        _write_slide(st, "e1", "t1", sid, X[sid], dtype)
    for sid, n in (other_tiling or {}).items():
        _write_tiles(st, "t2", sid, n)
    return st, X


def _stored(X: np.ndarray, dtype: str = "float16") -> np.ndarray:
    return X.astype(dtype).astype(np.float64)


# ----------------------------------------------------------------------------------------------
def test_aggregates_match_a_direct_mean_and_std(tmp_path):
    """Mean/std from the aggregates written at extraction equal numpy's over the stored values."""
    st, X = _store(tmp_path, {"A": 50, "B": 1, "C": 333})
    agg = slide_aggregates(st, "e1")
    assert agg.slide_ids == ["A", "B", "C"] and agg.n.tolist() == [50, 1, 333]
    for i, sid in enumerate(agg.slide_ids):
        np.testing.assert_allclose(agg.mean[i], _stored(X[sid]).mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(agg.std[i], _stored(X[sid]).std(0), rtol=1e-7, atol=1e-9)
    ids, M = slide_means(st, "e1", ["C", "A"])
    assert ids == ["C", "A"]
    np.testing.assert_allclose(M[0], _stored(X["C"]).mean(0), rtol=1e-12)
    with pytest.raises(HefeatError, match="no features in extraction e1"):
        slide_means(st, "e1", ["A", "nope"])


def test_aggregates_stay_current_when_slides_are_added_redone_or_removed(tmp_path):
    """The consolidated table is checked against the files on every read, even if an old copy is put back."""
    st, X = _store(tmp_path, {"A": 40, "B": 30})
    refresh_aggregates(st, "e1")  # the writers' step (after an extraction; hefeat compact)
    table_file = st.aggregates_path("e1")
    with h5py.File(table_file, "r") as f:
        assert [s.decode() for s in f["slide_id"][:]] == ["A", "B"]
    old_copy = tmp_path / "old_table.h5"
    shutil.copy(table_file, old_copy)

    _write_slide(st, "e1", "t1", "C", _features(9, 25))  # added
    redo = _features(10, 30) + 100  # redone with other values, same row count
    _write_slide(st, "e1", "t1", "B", redo)
    ids, M = slide_means(st, "e1")
    assert ids == ["A", "B", "C"]
    np.testing.assert_allclose(M[1], _stored(redo).mean(0), rtol=1e-12)
    np.testing.assert_allclose(M[2], _stored(_features(9, 25)).mean(0), rtol=1e-12)
    with h5py.File(table_file, "r") as f:  # a read never writes
        assert [s.decode() for s in f["slide_id"][:]] == ["A", "B"]
    refresh_aggregates(st, "e1")
    with h5py.File(table_file, "r") as f:  # rewritten with the new state
        assert [s.decode() for s in f["slide_id"][:]] == ["A", "B", "C"]
        np.testing.assert_allclose(f["sum"][1], _stored(redo).sum(0), rtol=1e-12)

    shutil.copy(old_copy, table_file)  # a stale table (e.g. restored from a backup) is not trusted
    ids, M = slide_means(st, "e1")
    assert ids == ["A", "B", "C"]
    np.testing.assert_allclose(M[1], _stored(redo).mean(0), rtol=1e-12)

    st.features_path("e1", "A").unlink()  # removed
    assert slide_means(st, "e1")[0] == ["B", "C"]


def test_files_without_aggregates_are_summarised_from_their_rows(tmp_path):
    """Feature files from before aggregates existed (or written by other tools) still give exact means."""
    st, _ = _store(tmp_path, {"A": 5})
    X = _features(3, 21)
    with h5py.File(st.features_path("e1", "L"), "w") as f:
        f.create_dataset("features", data=X.astype(np.float16), chunks=(4, DIM), compression="gzip")
        f.create_dataset("coords", data=np.zeros((21, 2), np.int64))
    assert slide_aggregates(st, "e1").slide_ids == ["A"]  # a file without its commit record is not read
    commit_ok(st, "extraction", "e1", "L", n_tiles=21, seconds=0.0, digest=None)
    agg = slide_aggregates(st, "e1", ["L"])
    np.testing.assert_allclose(agg.mean[0], _stored(X).mean(0), rtol=1e-12)
    # chunked + compressed: read through h5py, same values as the raw-offset path gives for A
    np.testing.assert_array_equal(read_features(st.features_path("e1", "L"), np.array([20, 0, 3, 3])),
                                  X.astype(np.float16).astype(np.float32)[[20, 0, 3, 3]])


# ----------------------------------------------------------------------------------------------
def test_load_slides_reads_only_them_with_file_metadata(tmp_path):
    st, X = _store(tmp_path, {"A": 12, "B": 9, "C": 4})
    meta, F = load_features(st, "e1", slides=["C", "A"])
    assert meta["slide_id"].tolist() == ["C"] * 4 + ["A"] * 12
    assert meta["tile_id"].tolist() == list(range(4)) + list(range(12))
    assert (meta["tiling_id"] == "t1").all() and meta["x"].tolist()[:4] == [0, 10, 20, 30]
    np.testing.assert_array_equal(F, np.concatenate([X["C"], X["A"]]).astype(np.float16).astype(np.float32))
    st.features_path("e1", "B").unlink()
    with pytest.raises(HefeatError, match="Slide B has no features"):
        load_features(st, "e1", slides=["B"])


def test_query_on_a_two_tiling_store_is_resolved_or_refused(tmp_path):
    """tile_id is unique only within a tiling: a query is resolved to the extraction's tiling, never mixed."""
    st, X = _store(tmp_path, {"A": 10, "B": 6}, other_tiling={"A": 40, "B": 25})
    assert len(st.sql("SELECT * FROM tiles WHERE tile_id < 3")) == 12  # both tilings in the view
    # unfiltered: resolved to t1 (only its rows, features of its tiles)
    meta, F = load_features(st, "e1", "SELECT slide_id, tile_id, sharpness FROM tiles WHERE tile_id % 4 = 1 "
                                      "ORDER BY slide_id DESC, tile_id")
    assert meta[["slide_id", "tile_id"]].values.tolist() == [["B", 1], ["B", 5], ["A", 1], ["A", 5], ["A", 9]]
    assert (meta["tiling_id"] == "t1").all() and "sharpness" in meta
    want = np.stack([X[s][t] for s, t in meta[["slide_id", "tile_id"]].values]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(F, want)
    # a user CTE still works
    m2, _ = load_features(st, "e1", "WITH s AS (SELECT slide_id, tile_id FROM tiles WHERE slide_id = 'A') SELECT * FROM s")
    assert len(m2) == 10
    # filtered on the other tiling: refused with a message
    with pytest.raises(HefeatError, match="another tiling"):
        load_features(st, "e1", "SELECT slide_id, tile_id FROM tiles WHERE tiling_id = 't2' AND tile_id > 30")
    # rows that say they are another tiling's (read around the view): refused
    with pytest.raises(HefeatError, match="tiles of tiling t2"):
        load_features(st, "e1", f"SELECT * FROM read_parquet('{st.tiling_dir('t2')}/*.parquet') WHERE tile_id < 5")
    # tile ids the extraction does not have: a clear error, never an IndexError or another row
    with pytest.raises(HefeatError, match=r"Tile ids \[30\] do not exist in slide A"):
        load_features(st, "e1", "SELECT 'A' AS slide_id, 30 AS tile_id")
    with pytest.raises(HefeatError, match="slide_id and tile_id"):
        load_features(st, "e1", "SELECT slide_id FROM tiles")


def test_float16_and_streaming_equal_float32(tmp_path):
    st, X = _store(tmp_path, {"A": 33, "B": 70, "C": 1})
    q = "SELECT slide_id, tile_id FROM tiles WHERE tile_id % 3 = 0 OR slide_id = 'C' ORDER BY tile_id, slide_id"
    for query in (None, q):
        m32, X32 = load_features(st, "e1", query)
        m16, X16 = load_features(st, "e1", query, dtype="float16")
        assert X16.dtype == np.float16 and X32.dtype == np.float32
        np.testing.assert_array_equal(X16.astype(np.float32), X32)
        pd.testing.assert_frame_equal(m16, m32)
        chunks = list(iter_features(st, "e1", query))
        streamed = pd.concat([c.tiles for c in chunks], ignore_index=True)
        rows = np.concatenate([c.features for c in chunks])
        order = m32.reset_index().merge(streamed.reset_index(), on=["slide_id", "tile_id"])
        np.testing.assert_array_equal(rows[order["index_y"]], X32[order["index_x"]])
        assert len(streamed) == len(m32)
    for sid, F in iter_slide_features(st, "e1", dtype="float16"):
        np.testing.assert_array_equal(F, X[sid].astype(np.float16))
    with pytest.raises(HefeatError, match="float32 or float16"):
        load_features(st, "e1", dtype="int8")


def test_half_to_float_is_exact_for_every_half():
    """Against numpy's own cast, all 65,536 bit patterns (NaNs compared as NaN)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    out = np.empty(h.shape, np.float32)
    half_to_float(h, out)
    ref = h.astype(np.float32)
    nan = np.isnan(ref)
    assert np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_global_rows_and_offsets(tmp_path):
    st, X = _store(tmp_path, {"A": 5, "B": 8, "C": 3}, dtype="float32")
    fo = feature_offsets(st, "e1")
    assert fo["offset"].tolist() == [0, 5, 13] and fo["n_tiles"].tolist() == [5, 8, 3]
    g = np.array([0, 4, 5, 12, 13, 15])
    allX = np.concatenate([X["A"], X["B"], X["C"]])
    np.testing.assert_array_equal(read_global_rows(st, "e1", fo, g), allX[g])
    t = slide_table(st, "e1", ["B"])
    assert t.files[0].n == 8 and t.files[0].offset > 0  # contiguous: read at its byte offset
