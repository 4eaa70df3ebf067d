"""The UMAP layout of an embedding matrix, its neighbour graph from faiss (McInnes et al. 2018, arXiv:1802.03426).

umap-learn finds neighbours with NNDescent and lays the graph out with numba functions that are compiled on every
first call in a process: ~20 s for 300 points and ~80 s for 5,000 on a 2-core machine, almost all of it compiling,
paid again by every CLI call. Here the k nearest neighbours are exact (a faiss flat index, the library neighbour
search already uses) up to EXACT_MAX points, which also skips NNDescent's compile, and umap-learn's own numba
functions are compiled once per machine into numba's on-disk cache (numba's `enable_caching`, which umap-learn does
not ask for). Above EXACT_MAX points (an O(n^2) search), umap-learn's approximate NNDescent is used as before.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np

EXACT_MAX = 100_000  # exact kNN costs ~40 s at 100,000 x 50 on 2 cores; NNDescent's compile alone is ~55 s


def knn_graph(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest rows of X by Euclidean distance, itself among them: (indices int64, distances float32).

    All rows against all rows of an array in memory (neighbors.exact_knn searches a store's files for queries)."""
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    d2, idx = index.search(X, k)
    return idx.astype(np.int64), np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)


@cache
def cache_umap_compiles() -> None:
    """Let umap-learn's numba functions use numba's on-disk cache (compiled once per machine, not per process)."""
    import umap.layouts
    import umap.umap_
    import umap.utils
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    for mod in (umap.umap_, umap.layouts, umap.utils):
        for f in vars(mod).values():
            if isinstance(f, CPUDispatcher) and f.py_func.__module__ == mod.__name__ and isinstance(f._cache, NullCache):
                try:
                    f.enable_caching()
                except RuntimeError:  # numba found no writable cache folder: compiled per process, as before
                    return


def umap_layout(X: np.ndarray, *, n_neighbors: int, min_dist: float, seed: int) -> tuple[np.ndarray, str]:
    """2-d UMAP coordinates of X's rows and how its neighbours were found ('exact' or 'nndescent')."""
    import umap

    cache_umap_compiles()
    k = min(n_neighbors, len(X) - 1)
    # n_jobs=1: a seeded UMAP runs single-threaded anyway (umap-learn warns when asked for more)
    kw = dict(n_neighbors=k, min_dist=min_dist, random_state=seed, n_jobs=1)
    if len(X) > EXACT_MAX:
        return umap.UMAP(**kw).fit_transform(X), "nndescent"
    idx, dist = knn_graph(X, k)
    with warnings.catch_warnings():  # no NNDescent index comes with it: `transform` is unavailable, not used here
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        # force_approximation_algorithm: below 4,096 rows umap-learn would otherwise ignore the given neighbours
        emb = umap.UMAP(**kw, precomputed_knn=(idx, dist, None), force_approximation_algorithm=True).fit_transform(X)
    return emb, "exact"
