"""The UMAP layout's neighbour graph (exact, from faiss) and umap-learn's compiles cached on disk."""

from __future__ import annotations

import numpy as np
import pytest


def _blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 12)) * 3
    label = rng.integers(0, 6, n)
    return (centres[label] + rng.normal(size=(n, 12))).astype(np.float32), label


def test_knn_graph_equals_brute_force_neighbours():
    from sklearn.neighbors import NearestNeighbors

    from hefeat.explore.umap_embed import knn_graph

    X, _ = _blobs(700)
    idx, dist = knn_graph(X, 9)
    d_ref, i_ref = NearestNeighbors(n_neighbors=9, algorithm="brute").fit(X.astype(np.float64)).kneighbors(X)
    assert idx.shape == (700, 9) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert (idx[:, 0] == np.arange(700)).all()  # no duplicate rows here: each row is its own nearest
    assert (idx == i_ref).mean() > 0.999 and np.allclose(dist, d_ref, atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_layout_uses_the_exact_graph_below_umaps_small_data_size_and_separates_clusters(monkeypatch):
    import umap

    from hefeat.explore import umap_embed

    seen = {}
    real = umap.UMAP

    class Spy(real):
        def __init__(self, **kw):
            seen.update(kw)
            super().__init__(**kw)

    monkeypatch.setattr(umap, "UMAP", Spy)
    X, label = _blobs(400)
    emb, how = umap_embed.umap_layout(X, n_neighbors=10, min_dist=0.1, seed=3)
    assert how == "exact" and emb.shape == (400, 2) and np.isfinite(emb).all()
    # Below 4,096 rows umap-learn ignores given neighbours unless forced; the given ones are faiss's exact graph.
    assert seen["force_approximation_algorithm"] is True
    assert (seen["precomputed_knn"][0] == umap_embed.knn_graph(X, 10)[0]).all()
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    assert cross_val_score(KNeighborsClassifier(5), emb, label, cv=3).mean() > 0.95
    again, _ = umap_embed.umap_layout(X, n_neighbors=10, min_dist=0.1, seed=3)
    assert np.array_equal(emb, again)  # seeded: the same layout


def test_above_the_exact_limit_umap_learn_finds_neighbours_itself(monkeypatch):
    import umap

    from hefeat.explore import umap_embed

    seen = {}

    class Fake:
        def __init__(self, **kw):
            seen.update(kw)

        def fit_transform(self, X):
            return np.zeros((len(X), 2), np.float32)

    monkeypatch.setattr(umap, "UMAP", Fake)
    monkeypatch.setattr(umap_embed, "EXACT_MAX", 50)
    emb, how = umap_embed.umap_layout(_blobs(60)[0], n_neighbors=15, min_dist=0.1, seed=0)
    assert how == "nndescent" and "precomputed_knn" not in seen and seen["n_neighbors"] == 15
    emb, how = umap_embed.umap_layout(_blobs(50)[0], n_neighbors=15, min_dist=0.1, seed=0)
    assert how == "exact" and seen["precomputed_knn"][0].shape == (50, 15)


@pytest.mark.parametrize("name", ["umap_.smooth_knn_dist", "umap_.compute_membership_strengths",
                                  "layouts._nb_optimize_layout_euclidean_single_epoch"])
def test_umap_learns_compiles_are_written_to_numbas_disk_cache(name):
    """umap-learn compiles these on every first call in a process (~20 s in all); with the cache they load."""
    import importlib
    import os

    from hefeat.explore.umap_embed import umap_layout

    umap_layout(_blobs(80)[0], n_neighbors=5, min_dist=0.1, seed=0)
    mod, fn = name.rsplit(".", 1)
    f = getattr(importlib.import_module(f"umap.{mod}"), fn)
    index = f._cache._cache_file._index_path  # a NullCache (umap-learn's default) has no file at all
    assert os.path.exists(index)
