"""Neighbour search and UMAP at cohort scale on synthetic clustered vectors.

For each index type (built with hefeat's own index construction): build time, query latency p50/p95
(one query at a time, k=10) and recall@10 against exact search; then UMAP time for --umap points.
Run: python benchmarks/explore.py [--n 1000000 --dim 1024 --types flat,ivf,ivfpq,hnsw --umap 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def clustered(n: int, dim: int, seed: int = 0, k: int = 2000) -> np.ndarray:
    """float16 vectors around k centres (like tile embeddings: many tissue 'kinds', noise within)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float16)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        out[i:i + m] = centres[rng.integers(0, k, m)] + 0.35 * rng.normal(size=(m, dim)).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--types", default="flat,ivf,ivfpq,hnsw")
    ap.add_argument("--hnsw-n", type=int, default=None, help="build HNSW on the first N vectors only")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--umap", type=int, default=100_000)
    a = ap.parse_args()
    import faiss

    from hefeat.explore.neighbors import RERANK_FACTOR, _make, _prep

    X16 = clustered(a.n, a.dim)
    X = _prep(X16.astype(np.float32), "cosine")
    del X16
    rng = np.random.default_rng(1)
    qi = rng.choice(a.n, a.queries, replace=False)
    Q = X[qi] + 0.01 * rng.normal(size=(a.queries, a.dim)).astype(np.float32)
    Q = _prep(Q, "cosine")
    exact = faiss.IndexFlatIP(a.dim)
    exact.add(X)
    _, truth = exact.search(Q, 10)
    del exact
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "n": a.n, "dim": a.dim, "metric": "cosine",
           "date": time.strftime("%Y-%m-%d"), "indexes": {}}
    for kind in [k for k in a.types.split(",") if k]:
        n = a.hnsw_n if (kind == "hnsw" and a.hnsw_n) else a.n
        t = time.perf_counter()
        idx = _make(kind, a.dim, "cosine", n, nlist=None, pq_m=None, hnsw_m=32, n_train=min(n, 100_000))
        if not idx.is_trained:
            idx.train(X[rng.choice(n, min(n, 100_000), replace=False)])
        for i in range(0, n, 100_000):
            idx.add(X[i:min(i + 100_000, n)])
        build = time.perf_counter() - t
        lat = []
        found = np.empty((a.queries, 10), np.int64)
        for j in range(a.queries):
            t = time.perf_counter()
            if kind == "ivfpq":  # as hefeat does: 50x candidates re-ranked exactly (here from memory, not HDF5)
                _, cand = idx.search(Q[j:j + 1], 10 * RERANK_FACTOR)
                c = cand[0][cand[0] >= 0]
                nn = c[np.argsort(-(X[c] @ Q[j]), kind="stable")[:10]][None]
            else:
                _, nn = idx.search(Q[j:j + 1], 10)
            lat.append((time.perf_counter() - t) * 1000)
            found[j] = nn[0]
        tr = truth if n == a.n else None
        if tr is None:  # HNSW on a subset: exact truth on the same subset
            sub = faiss.IndexFlatIP(a.dim)
            sub.add(X[:n])
            _, tr = sub.search(Q, 10)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, tr, strict=True)]))
        res["indexes"][kind] = {"vectors": n, "build_s": round(build, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                                "p95_ms": round(float(np.percentile(lat, 95)), 3), "recall_at_10": round(recall, 3),
                                "nprobe": getattr(idx, "nprobe", None)}
        print(kind, res["indexes"][kind], flush=True)
        del idx
    if a.umap:
        import umap
        from sklearn.decomposition import PCA

        from hefeat.explore.umap_embed import umap_layout

        S = X[rng.choice(a.n, a.umap, replace=False)]
        P = PCA(50, random_state=0).fit_transform(S)
        # hefeat's layout first (umap-learn's compiles from numba's disk cache, filled by any earlier run), then
        # umap-learn's own call in the same process (its NNDescent compiles here, as in every fresh process).
        t = time.perf_counter()
        _, how = umap_layout(P, n_neighbors=15, min_dist=0.1, seed=0)
        res["umap_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        umap.UMAP(random_state=0, n_jobs=1).fit_transform(P)
        res["umap_learn_s"] = round(time.perf_counter() - t, 1)
        res["umap_points"], res["umap_neighbours"] = a.umap, how
        print(f"UMAP {a.umap:,} points (PCA 50): hefeat {res['umap_s']} s ({how} neighbours), umap-learn "
              f"{res['umap_learn_s']} s, ratio {res['umap_learn_s'] / res['umap_s']:.2f}x", flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
