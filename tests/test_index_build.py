"""Neighbour index building: one streaming pass, offsets instead of an id table, data fingerprint in the id."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.explore import neighbors
from hefeat.explore.neighbors import build_index, exact_knn, load_index, query
from hefeat.store.atomic import write_json
from hefeat.store.catalog import Store
from hefeat.store.commit import commit_ok
from hefeat.store.features import FeatureFileWriter, read_features
from hefeat.store.tables import write_parquet

SIZES = [130, 7, 401, 1, 260, 333, 90]  # uneven slides, so an off-by-one in the offsets shows


def _write(st: Store, sid: str, X: np.ndarray) -> None:
    n = len(X)
    write_parquet(pd.DataFrame({"tiling_id": "tv", "slide_id": sid, "tile_id": np.arange(n), "x": np.arange(n) * 10,
                                "y": np.zeros(n, np.int64)}), st.tiles_path("tv", sid))
    commit_ok(st, "tiling", "tv", sid, n_tiles=n, seconds=0.0, digest=None)  # visible through its record
    w = FeatureFileWriter(st.features_path("ev", sid), len(X), X.shape[1], dtype="float32",
                          coords=np.zeros((len(X), 2)), attrs={"extraction_id": "ev", "slide_id": sid})
    w.write(0, X)
    w.commit()
    commit_ok(st, "extraction", "ev", sid, n_tiles=n, seconds=0.0, digest=None)


def _store(tmp_path) -> tuple[Store, np.ndarray]:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(25, 24)) * 3
    X = (centres[rng.integers(0, 25, sum(SIZES))] + rng.normal(size=(sum(SIZES), 24))).astype(np.float32)
    st = Store.init(tmp_path / "st")
    write_json(st.extraction_dir("ev") / "_extraction.json", {"extraction_id": "ev", "tiling_id": "tv", "dim": 24})
    write_json(st.tiling_dir("tv") / "_tiling.json", {"tiling_id": "tv", "mpp": 0.5, "size": 224})
    a = 0
    for i, n in enumerate(SIZES):
        _write(st, f"V{i:02d}", X[a:a + n])
        a += n
    return st, X


def _brute(X: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    return np.argsort(-(Qn @ Xn.T), axis=1, kind="stable")[:, :k]


def test_streaming_flat_index_equals_brute_force_and_offsets_map_back(tmp_path, monkeypatch):
    """Built in many small chunks: flat cosine search = numpy brute force; global id g holds tile (slide, tile)'s vector."""
    monkeypatch.setattr(neighbors, "STREAM_ROWS", 150)
    st, X = _store(tmp_path)
    meta = build_index(st, "ev", index="flat", n_queries=60)
    assert meta["recall_at_10"] == 1.0 and meta["n_vectors"] == len(X) and meta["recall_queries"] == 60
    idx, ids = load_index(st, meta)
    assert ids.n_tiles.tolist() == SIZES and len(ids) == len(X)
    starts = np.cumsum([0, *SIZES])[:-1]
    g = np.unique(np.r_[starts, starts[1:] - 1, len(X) - 1, np.random.default_rng(0).choice(len(X), 40, replace=False)])
    _, nn = idx.search(neighbors._prep(X[g], "cosine"), 10)
    np.testing.assert_array_equal(np.sort(nn, 1), np.sort(_brute(X, X[g], 10), 1))
    keys = ids.keys(g)
    for gid, r in zip(g, keys.itertuples(), strict=True):
        stored = idx.reconstruct(int(gid))
        want = neighbors._prep(read_features(st.features_path("ev", r.slide_id), np.array([r.tile_id])), "cosine")[0]
        np.testing.assert_allclose(stored, want, rtol=1e-6)
        assert ids.global_id(r.slide_id, r.tile_id) == gid
    # the streamed exact search (many chunks) agrees with brute force too
    Q = neighbors._prep(X[g[:20]], "cosine")
    np.testing.assert_array_equal(np.sort(exact_knn(st, "ev", ids, Q, 10, "cosine"), 1), np.sort(_brute(X, X[g[:20]], 10), 1))
    with pytest.raises(HefeatError, match="not in this index"):
        ids.global_id("V03", 1)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_streaming_approximate_indexes_measure_recall(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(neighbors, "STREAM_ROWS", 400)
    st, X = _store(tmp_path)
    meta = build_index(st, "ev", index=kind, sample=len(X), nlist=8, pq_m=4)
    assert meta["type"] == kind and meta["recall_at_10"] >= 0.9, meta
    res = query(st, extraction_id="ev", vector=X[5], k=3)
    assert res.loc[0, "slide_id"] == "V00" and res.loc[0, "tile_id"] == 5


def test_index_id_follows_the_data_and_a_stale_index_is_refused(tmp_path):
    st, X = _store(tmp_path)
    first = build_index(st, "ev", index="flat")
    assert build_index(st, "ev", index="flat")["cached"]
    _write(st, "V99", X[:11] + 1)  # a slide added after the build
    with pytest.raises(HefeatError, match="rebuild"):
        query(st, extraction_id="ev", vector=X[0], k=3)
    with pytest.raises(HefeatError, match="rebuild"):
        query(st, index_id=first["index_id"], vector=X[0], k=3)
    second = build_index(st, "ev", index="flat")
    assert second["index_id"] != first["index_id"] and not second["cached"] and second["n_vectors"] == len(X) + 11
    res = query(st, extraction_id="ev", vector=X[0] + 1, k=1)
    assert res.loc[0, "slide_id"] == "V99" and res.loc[0, "tile_id"] == 0
