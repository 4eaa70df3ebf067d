"""Cohort-wide nearest-neighbour search over a store's embeddings with faiss.

Indexes are built slide by slide (never the whole store in memory for IVF/PQ), trained on a seeded
sample, stored with their provenance and the recall@10 measured at build time against exact search.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.atomic import atomic_path, read_json, write_json
from hefeat.store.catalog import Store
from hefeat.store.features import (
    feature_offsets,
    iter_slide_features,
    read_features,
    read_global_rows,
)
from hefeat.store.ids import content_id
from hefeat.store.runs import timestamp
from hefeat.store.tables import write_parquet

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")


def _prep(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if metric == "cosine":
        n = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(n, 1e-12)
    return x


def choose_type(n: int, dim: int, *, memory_bytes: int | None = None) -> str:
    """flat up to 100k vectors; IVF-Flat while raw vectors fit in half the memory; IVF-PQ beyond."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n <= 100_000:
        return "flat"
    if n * dim * 4 < memory_bytes / 2:
        return "ivf"
    return "ivfpq"


def _make(kind: str, dim: int, metric: str, n: int, *, nlist: int | None, pq_m: int | None, hnsw_m: int,
          n_train: int | None = None):
    import faiss

    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, hnsw_m, mt)
        idx.hnsw.efConstruction = 80
        idx.hnsw.efSearch = 64
        return idx
    # ~4 sqrt(n) lists, but never more than the training sample supports (faiss wants >= 39 points a list)
    nlist = nlist or max(1, min(int(4 * np.sqrt(n)), (n_train or n) // 39 or 1))
    quant = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    if kind == "ivf":
        idx = faiss.IndexIVFFlat(quant, dim, nlist, mt)
    elif kind == "ivfpq":
        # 8-d sub-vectors, 8 bits each (dim/8 bytes a vector: 32x smaller than float32)
        m = pq_m or next(m for m in (128, 64, 32, 16, 8, 4, 2, 1) if (dim % m == 0 and dim // m >= 8) or m == 1)
        idx = faiss.IndexIVFPQ(quant, dim, nlist, m, 8, mt)
    else:
        raise HefeatError(f"index type must be one of {', '.join(INDEX_TYPES)}")
    idx.nprobe = max(1, min(nlist, 16 if kind == "ivf" else 32))
    return idx


def _sample(store: Store, eid: str, fi: pd.DataFrame, n: int, seed: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of vectors (and their global ids), reading one slide at a time."""
    total = int(fi["n_tiles"].sum())
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    return _prep(read_global_rows(store, eid, fi, pick), metric), pick


def exact_knn(store: Store, eid: str, fi: pd.DataFrame, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-k global ids for `queries`, streaming the store slide by slide."""
    best_d = np.full((len(queries), k), -np.inf if metric == "cosine" else np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for r, (_, F) in zip(fi.itertuples(), iter_slide_features(store, eid, fi["slide_id"].tolist()), strict=True):
        V = _prep(F, metric)
        if metric == "cosine":
            d = queries @ V.T
        else:
            d = (queries**2).sum(1)[:, None] - 2 * queries @ V.T + (V**2).sum(1)[None]
        ids = np.arange(r.offset, r.offset + len(V))
        D = np.concatenate([best_d, d], 1)
        idx_all = np.concatenate([best_i, np.broadcast_to(ids, d.shape)], 1)
        order = np.argsort(-D if metric == "cosine" else D, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(D, order, 1), np.take_along_axis(idx_all, order, 1)
    return best_i


RERANK_FACTOR = 50  # IVF-PQ: k x 50 candidates re-ranked with exact distances read from the feature files


def rerank(store: Store, eid: str, ids: pd.DataFrame, queries: np.ndarray, cand: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact (distance, global id) top-k among candidate ids, reading only the candidate rows per slide."""
    flat = np.unique(cand[cand >= 0])
    rows = ids.iloc[flat]
    vec = np.empty((len(flat), queries.shape[1]), np.float32)
    for sid, idx in rows.groupby("slide_id").indices.items():
        vec[idx] = read_features(store.features_path(eid, sid), rows["tile_id"].to_numpy()[idx])
    vec = _prep(vec, metric)
    pos = np.searchsorted(flat, np.where(cand >= 0, cand, flat[0]))
    D = np.empty((len(queries), k), np.float32)
    top = np.full((len(queries), k), -1, np.int64)
    for q in range(len(queries)):
        c = pos[q][cand[q] >= 0]
        v = vec[c]
        d = v @ queries[q] if metric == "cosine" else ((v - queries[q]) ** 2).sum(1)
        o = np.argsort(-d if metric == "cosine" else d, kind="stable")[:k]
        D[q, :len(o)], top[q, :len(o)] = d[o], flat[c[o]]
    return D, top


def _search(store: Store, meta: dict, idx, ids: pd.DataFrame, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Index search; IVF-PQ candidates are re-ranked exactly from the feature files."""
    if meta["type"] != "ivfpq":
        return idx.search(Q, k)
    _, cand = idx.search(Q, min(k * RERANK_FACTOR, idx.ntotal))
    return rerank(store, meta["extraction_id"], ids, Q, cand, k, meta["metric"])


def build_index(store: Store, extraction_id: str, *, index: str = "auto", metric: str = "cosine",
                sample: int = 100_000, seed: int = 0, nlist: int | None = None, pq_m: int | None = None,
                hnsw_m: int = 32, n_queries: int = 200, force: bool = False) -> dict:
    """Build (or find) a neighbour index over an extraction; returns its provenance with recall@10."""
    import faiss

    if index not in INDEX_TYPES:
        raise HefeatError(f"--index must be one of {', '.join(INDEX_TYPES)}")
    if metric not in ("cosine", "l2"):
        raise HefeatError("--metric must be cosine or l2")
    fi = feature_offsets(store, extraction_id)
    n = int(fi["n_tiles"].sum())
    dim = int(store.extraction(extraction_id)["dim"])
    kind = choose_type(n, dim) if index == "auto" else index
    params = {"extraction_id": extraction_id, "type": kind, "metric": metric, "sample": sample, "seed": seed,
              "nlist": nlist, "pq_m": pq_m, "hnsw_m": hnsw_m, "n": n}
    iid = content_id(params, prefix="i")
    d = store.index_dir(iid)
    if (d / "index.json").exists() and not force:
        return {**read_json(d / "index.json"), "cached": True}
    t0 = time.perf_counter()
    idx = _make(kind, dim, metric, n, nlist=nlist, pq_m=pq_m, hnsw_m=hnsw_m, n_train=min(sample, n))
    train, train_ids = _sample(store, extraction_id, fi, sample, seed, metric)
    if not idx.is_trained:
        if len(train) < getattr(idx, "nlist", 1):
            raise HefeatError(f"{n} vectors are too few to train a {kind} index; use --index flat")
        idx.train(train)
    for _r, (_, F) in zip(fi.itertuples(), iter_slide_features(store, extraction_id, fi["slide_id"].tolist()), strict=True):
        idx.add(_prep(F, metric))  # ids are insertion order = global ids
    build_s = time.perf_counter() - t0
    # Recall@10 on held-out queries (vectors not used to train) against exact search.
    rng = np.random.default_rng(seed + 1)
    held = np.setdiff1d(np.arange(n), train_ids) if len(train_ids) < n else np.arange(n)
    qids = np.sort(rng.choice(held, min(n_queries, len(held)), replace=False))
    Q = _prep(read_global_rows(store, extraction_id, fi, qids), metric)
    k = min(10, n)
    exact = exact_knn(store, extraction_id, fi, Q, k, metric)
    ids = pd.concat([pd.DataFrame({"global_id": np.arange(r.offset, r.offset + r.n_tiles), "slide_id": r.slide_id,
                                   "tile_id": np.arange(r.n_tiles)}) for r in fi.itertuples()], ignore_index=True)
    t = time.perf_counter()
    _, approx = _search(store, {"type": kind, "extraction_id": extraction_id, "metric": metric}, idx, ids, Q, k)
    query_ms = (time.perf_counter() - t) / len(Q) * 1000
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(approx, exact, strict=True)]))
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "index.faiss") as tmp:
        faiss.write_index(idx, str(tmp))
    write_parquet(ids, d / "ids.parquet")
    meta = {"index_id": iid, "extraction_id": extraction_id, "type": kind, "metric": metric, "n_vectors": n,
            "dim": dim, "recall_at_10": recall, "build_seconds": round(build_s, 3), "query_ms": round(query_ms, 4),
            "params": params, "created": timestamp()}
    write_json(d / "index.json", meta)
    return {**meta, "cached": False}


def _resolve_index(store: Store, extraction_id: str | None, index_id: str | None) -> dict:
    if index_id:
        p = store.index_dir(index_id) / "index.json"
        if not p.exists():
            raise HefeatError(f"No index {index_id!r} in the store; build one with hefeat neighbors build")
        meta = read_json(p)
        if extraction_id and meta["extraction_id"] != extraction_id:
            raise HefeatError(f"Index {index_id} was built for extraction {meta['extraction_id']}, not {extraction_id}")
        return meta
    rows = store.sql("SELECT index_id FROM indexes WHERE extraction_id = ? ORDER BY created DESC", [extraction_id])
    if rows.empty:
        raise HefeatError(f"No neighbour index for extraction {extraction_id}; run: hefeat neighbors build --extraction {extraction_id}")
    return read_json(store.index_dir(rows["index_id"].iloc[0]) / "index.json")


def load_index(store: Store, meta: dict):
    """The faiss index and its global-id -> (slide_id, tile_id) table (cached while the files are unchanged)."""
    p = store.index_dir(meta["index_id"]) / "index.faiss"
    return _load_index_files(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_index_files(path: str, _mtime_ns: int):
    import faiss

    return faiss.read_index(path), pd.read_parquet(Path(path).with_name("ids.parquet"))


def _keys(ids: pd.DataFrame, global_ids: np.ndarray) -> pd.DataFrame:
    """(slide_id, tile_id) rows of global ids."""
    return ids.iloc[global_ids][["slide_id", "tile_id"]].reset_index(drop=True)


def query(store: Store, *, extraction_id: str | None = None, index_id: str | None = None,
          tile: tuple[str, int] | None = None, image: str | None = None, slide: str | None = None,
          vector: np.ndarray | None = None, k: int = 20, exclude_same_slide: bool = False,
          exclude_same_patient: bool = False, include_self: bool = False, write: bool = False) -> pd.DataFrame:
    """Nearest tiles to a tile, an image file, a slide's mean embedding or a vector; joined with slide metadata.

    A query tile is never its own neighbour unless include_self; same-slide / same-patient exclusion
    applies to tile and slide queries. `distance` is 1 - cosine similarity (cosine) or Euclidean (l2).
    """
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= 1000:
        raise HefeatError(f"k must be an integer from 1 to 1000 (got {k!r})")
    meta = _resolve_index(store, extraction_id, index_id)
    eid = meta["extraction_id"]
    idx, ids = load_index(store, meta)
    src_slide, self_key = None, None
    if tile is not None:
        sid, tid = tile
        n = store.sql("SELECT n_tiles FROM features_index WHERE extraction_id = ? AND slide_id = ?", [eid, sid])
        if n.empty or not (0 <= int(tid) < int(n.iloc[0, 0])):
            raise HefeatError(f"Tile {sid}:{tid} does not exist in extraction {eid}")
        q = read_features(store.features_path(eid, sid), np.array([int(tid)]))
        src_slide, self_key = sid, (sid, int(tid))
    elif image is not None:
        from hefeat.explore.embed import embed_image

        q = embed_image(store, eid, image)[None]
    elif slide is not None:
        if not store.features_path(eid, slide).exists():
            raise HefeatError(f"Slide {slide} has no features in extraction {eid}")
        q = read_features(store.features_path(eid, slide)).mean(0, keepdims=True)
        src_slide = slide
    elif vector is not None:
        q = np.asarray(vector, np.float32)[None]
    else:
        raise HefeatError("Give a tile (SLIDE:TILE_ID), an image file, a slide or a vector to query")
    slides_meta = store.sql("SELECT slide_id, patient_id, site FROM slides")
    patient_of = dict(zip(slides_meta["slide_id"], slides_meta["patient_id"], strict=True))
    src_patient = patient_of.get(src_slide) if src_slide else None
    Q = _prep(q, meta["metric"])
    kk = min(k + 1, idx.ntotal)
    while True:  # widen the search until k neighbours survive the exclusions (or the index is exhausted)
        D, nn = _search(store, meta, idx, ids, Q, kk)
        ok = nn[0] >= 0
        res = _keys(ids, nn[0][ok])
        dist = D[0][ok]
        res["distance"] = np.maximum(1 - dist, 0) if meta["metric"] == "cosine" else np.sqrt(np.maximum(dist, 0))
        keep = np.ones(len(res), bool)
        if self_key and not include_self:
            keep &= ~((res["slide_id"] == self_key[0]) & (res["tile_id"] == self_key[1])).to_numpy()
        if exclude_same_slide and src_slide:
            keep &= (res["slide_id"] != src_slide).to_numpy()
        if exclude_same_patient and src_patient is not None:
            keep &= (res["slide_id"].map(patient_of) != src_patient).to_numpy()
        if keep.sum() >= k or kk >= idx.ntotal:
            break
        kk = min(kk * 4, idx.ntotal)
    res = res[keep].head(k).reset_index(drop=True)
    res.insert(0, "rank", np.arange(1, len(res) + 1))
    tid_ = store.extraction(eid)["tiling_id"]
    meta_tiles = pd.concat([store.tiles(tid_, s)[["tile_id", "x", "y"]].assign(slide_id=s)
                            for s in res["slide_id"].unique()], ignore_index=True)
    res = res.merge(meta_tiles, on=["slide_id", "tile_id"], how="left")
    res = res.merge(slides_meta, on="slide_id", how="left").sort_values("rank").reset_index(drop=True)
    res.attrs.update(index_id=meta["index_id"], metric=meta["metric"], extraction_id=eid, tiling_id=tid_)
    if write:
        qid = content_id({"index": meta["index_id"], "tile": tile, "image": image, "slide": slide, "k": k,
                          "x": exclude_same_slide, "p": exclude_same_patient, "self": include_self}, prefix="q")
        out = res.assign(query_id=qid, index_id=meta["index_id"])
        write_parquet(out, store.index_dir(meta["index_id"]) / "queries" / f"{qid}.parquet")
        res.attrs["query_id"] = qid
    return res


def latent_vs_physical(store: Store, extraction_id: str, *, n: int = 500, seed: int = 0, index_id: str | None = None) -> dict:
    """ST-Net's check: how often a tile's nearest latent neighbour (not itself) is a physically adjacent tile."""
    meta = _resolve_index(store, extraction_id, index_id)
    idx, ids = load_index(store, meta)
    tid = store.extraction(extraction_id)["tiling_id"]
    grid = store.sql(f"SELECT slide_id, tile_id, row, col FROM tiles WHERE tiling_id = '{tid}'")
    ids = ids.merge(grid, on=["slide_id", "tile_id"], how="left")
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), min(n, len(ids)), replace=False))
    Q = read_global_rows(store, extraction_id, feature_offsets(store, extraction_id), pick)
    _, nn = _search(store, meta, idx, ids[["global_id", "slide_id", "tile_id"]], _prep(Q, meta["metric"]), 2)
    adj = same = 0
    for q, row in zip(pick, nn, strict=True):
        nb = row[1] if row[0] == q else row[0]
        a, b = ids.iloc[q], ids.iloc[nb]
        if a.slide_id == b.slide_id:
            same += 1
            adj += int(abs(a.row - b.row) <= 1 and abs(a.col - b.col) <= 1)
    return {"n_queries": len(pick), "adjacent_share": adj / len(pick), "same_slide_share": same / len(pick)}
