"""Cohort-wide nearest-neighbour search over a store's embeddings with faiss.

An index is built in one streaming pass over the feature files (never the whole store in memory for
IVF/PQ), trained on a seeded sample, stored with its provenance, the fingerprint of the data it holds
and the recall@10 measured at build time against exact search. Faiss ids are global row ids: slide
order, then tile_id; per-slide offsets map them back to (slide_id, tile_id).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.atomic import atomic_path, read_json, write_json
from hefeat.store.catalog import Store
from hefeat.store.features import (
    iter_slide_features,
    read_features,
    read_global_rows,
    slide_table,
)
from hefeat.store.ids import extraction_fingerprint, index_id, query_id
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
    """flat up to 100k vectors; IVF-Flat while raw float32 vectors take under a quarter of the memory; IVF-PQ beyond."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n <= 100_000:
        return "flat"
    if n * dim * 4 < memory_bytes / 4:
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
    if not nlist:
        # IVF-Flat: ~4 sqrt(n) lists (fast exact scans of short lists). IVF-PQ is for tens of millions of
        # vectors, where assigning every vector to its list dominates the build (n x nlist x dim flops)
        # and re-ranking restores precision: ~sqrt(n)/4 lists (1,118 at 20M). Never more lists than the
        # training sample supports (faiss wants >= 39 points a list).
        want = 4 * np.sqrt(n) if kind == "ivf" else max(256.0, np.sqrt(n) / 4)
        nlist = max(1, min(int(want), (n_train or n) // 39 or 1))
    quant = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    if kind == "ivf":
        idx = faiss.IndexIVFFlat(quant, dim, nlist, mt)
    elif kind == "ivfpq":
        # 8-d sub-vectors, 8 bits each (dim/8 bytes a vector: 32x smaller than float32)
        m = pq_m or next(m for m in (128, 64, 32, 16, 8, 4, 2, 1) if (dim % m == 0 and dim // m >= 8) or m == 1)
        idx = faiss.IndexIVFPQ(quant, dim, nlist, m, 8, mt)
        # Codebooks only pre-select candidates for the exact re-ranking: 10 k-means rounds on <= 128
        # points per code word train them in a third of faiss' default time (measured recall unchanged).
        idx.pq.cp.niter = 10
        idx.pq.cp.max_points_per_centroid = 128
        # ... and fewer than faiss' 39 points per code word is expected there: without this, every one of
        # the m sub-quantizers prints "WARNING clustering N points to 256 centroids" (m lines that tell nothing).
        idx.pq.cp.min_points_per_centroid = 1
    else:
        raise HefeatError(f"index type must be one of {', '.join(INDEX_TYPES)}")
    idx.cp.niter = 10  # coarse k-means: the partition only needs to be balanced, not converged
    idx.nprobe = max(1, min(nlist, 16 if kind == "ivf" else 32))
    return idx


@dataclass(frozen=True)
class TileIds:
    """Global row id <-> (slide_id, tile_id) of an index: its slides in order and each one's first global row.

    Global id g of slide i is offsets[i] + tile_id; 10,000 slides take 10,000 rows, not one row per tile.
    """

    slide_ids: np.ndarray  # (n_slides,) str
    offsets: np.ndarray  # (n_slides + 1,) int64; offsets[-1] = number of vectors

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_tiles(self) -> np.ndarray:
        """Tiles per slide (index order)."""
        return np.diff(self.offsets)

    def keys(self, global_ids: np.ndarray) -> pd.DataFrame:
        """global_id, slide_id, tile_id of global row ids (in the given order)."""
        g = np.asarray(global_ids, np.int64)
        if len(g) and (g.min() < 0 or g.max() >= len(self)):
            raise HefeatError(f"global row ids outside 0..{len(self) - 1}")
        s = np.searchsorted(self.offsets, g, side="right") - 1
        return pd.DataFrame({"global_id": g, "slide_id": self.slide_ids[s], "tile_id": g - self.offsets[s]})

    def global_id(self, slide_id: str, tile_id: int) -> int:
        """Global row id of one tile; a clear error if the index does not hold it."""
        i = int(np.searchsorted(self.slide_ids, slide_id))
        if i >= len(self.slide_ids) or self.slide_ids[i] != slide_id or not 0 <= int(tile_id) < self.n_tiles[i]:
            raise HefeatError(f"Tile {slide_id}:{tile_id} is not in this index")
        return int(self.offsets[i]) + int(tile_id)

    def to_frame(self) -> pd.DataFrame:
        """slide_id, offset, n_tiles (what is stored next to the index)."""
        return pd.DataFrame({"slide_id": self.slide_ids, "offset": self.offsets[:-1], "n_tiles": self.n_tiles})

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> TileIds:
        """From a slide_id/offset/n_tiles frame (slides sorted)."""
        n = df["n_tiles"].to_numpy(np.int64)
        return cls(df["slide_id"].to_numpy(object).astype(str), np.concatenate([[0], np.cumsum(n)]).astype(np.int64))


def _offsets_frame(ids: TileIds) -> pd.DataFrame:
    return ids.to_frame()[["slide_id", "n_tiles", "offset"]]


def _read_rows(store: Store, eid: str, ids: TileIds, global_ids: np.ndarray, metric: str) -> np.ndarray:
    """Prepared float32 vectors of sorted global ids, reading only the blocks that hold them."""
    return _prep(read_global_rows(store, eid, _offsets_frame(ids), global_ids), metric)


class _ExactTopK:
    """Exact top-k of a few query vectors, merged chunk by chunk during the build's single pass."""

    def __init__(self, Q: np.ndarray, k: int, metric: str):
        import faiss

        self.Q, self.k = Q, k
        self.metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self.score = np.full((len(Q), k), -np.inf, np.float32)  # higher is nearer
        self.ids = np.full((len(Q), k), -1, np.int64)

    def update(self, V: np.ndarray, first_id: int) -> None:
        import faiss

        D, I = faiss.knn(self.Q, V, min(self.k, len(V)), metric=self.metric)  # noqa: E741 (faiss' names)
        S = np.concatenate([self.score, D if self.metric == faiss.METRIC_INNER_PRODUCT else -D], 1)
        G = np.concatenate([self.ids, I + first_id], 1)
        order = np.lexsort((G, -S), axis=1)[:, :self.k]  # nearest first, ties by global id
        self.score, self.ids = np.take_along_axis(S, order, 1), np.take_along_axis(G, order, 1)


def exact_knn(store: Store, eid: str, ids: TileIds, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-k global ids for prepared `queries`, streaming the extraction slide by slide."""
    top = _ExactTopK(queries, k, metric)
    for start, V in _stream(store, eid, ids, metric):
        top.update(V, start)
    return top.ids


STREAM_ROWS = 131_072  # vectors per chunk of the build's pass (~128 MB at 256-d float32 plus the exact-search block)


def _stream(store: Store, eid: str, ids: TileIds, metric: str):
    """(first global id, prepared float32 vectors) in chunks of whole slides, one pass in global-id order."""
    batch: list[np.ndarray] = []
    start = pos = 0
    for _sid, F in iter_slide_features(store, eid, list(ids.slide_ids)):
        batch.append(F)
        pos += len(F)
        if pos - start >= STREAM_ROWS:
            yield start, _prep(np.concatenate(batch) if len(batch) > 1 else batch[0], metric)
            batch, start = [], pos
    if batch:
        yield start, _prep(np.concatenate(batch) if len(batch) > 1 else batch[0], metric)


RERANK_FACTOR = 50  # IVF-PQ: k x 50 candidates re-ranked with exact distances read from the feature files


def rerank(store: Store, eid: str, ids: TileIds, queries: np.ndarray, cand: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact (score, global id) top-k among candidate ids, reading only the candidate rows per slide."""
    flat = np.unique(cand[cand >= 0])
    vec = _read_rows(store, eid, ids, flat, metric)
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


def _search(store: Store, meta: dict, idx, ids: TileIds, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Index search; IVF-PQ candidates are re-ranked exactly from the feature files."""
    if meta["type"] != "ivfpq":
        return idx.search(Q, k)
    _, cand = idx.search(Q, min(k * RERANK_FACTOR, idx.ntotal))
    return rerank(store, meta["extraction_id"], ids, Q, cand, k, meta["metric"])


def build_index(store: Store, extraction_id: str, *, index: str = "auto", metric: str = "cosine",
                sample: int = 100_000, seed: int = 0, nlist: int | None = None, pq_m: int | None = None,
                hnsw_m: int = 32, n_queries: int = 200, force: bool = False, progress: bool = False) -> dict:
    """Build (or find) a neighbour index over an extraction in one streaming pass; returns provenance with recall@10.

    A seeded sample trains IVF/PQ (read sparsely), then every vector is read once, in global-id order,
    and added; the same pass computes exact neighbours of `n_queries` held-out vectors, so recall@10
    is measured without a second pass. Global ids map back to tiles through per-slide offsets.
    """
    import faiss
    from tqdm import tqdm

    if index not in INDEX_TYPES:
        raise HefeatError(f"--index must be one of {', '.join(INDEX_TYPES)}")
    if metric not in ("cosine", "l2"):
        raise HefeatError("--metric must be cosine or l2")
    table = slide_table(store, extraction_id)
    if not table.files:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides")
    ids = TileIds(np.array(table.slide_ids, dtype=object).astype(str),
                  np.concatenate([[0], np.cumsum([f.n for f in table.files])]).astype(np.int64))
    n = len(ids)
    dim = int(store.extraction(extraction_id)["dim"])
    kind = choose_type(n, dim) if index == "auto" else index
    fp = extraction_fingerprint(store, extraction_id)
    params = {"extraction_id": extraction_id, "type": kind, "metric": metric, "sample": sample, "seed": seed,
              "nlist": nlist, "pq_m": pq_m, "hnsw_m": hnsw_m, "n": n}
    iid = index_id(params, {"features": fp})
    d = store.index_dir(iid)
    if (d / layout.INDEX_META).exists() and not force:
        return {**read_json(d / layout.INDEX_META), "cached": True}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(n, min(sample, n), replace=False))
    held = np.setdiff1d(np.arange(n), train_ids) if len(train_ids) < n else np.arange(n)
    qids = np.sort(np.random.default_rng(seed + 1).choice(held, min(n_queries, len(held)), replace=False))
    k = min(10, n)
    Q = _read_rows(store, extraction_id, ids, qids, metric)
    idx = _make(kind, dim, metric, n, nlist=nlist, pq_m=pq_m, hnsw_m=hnsw_m, n_train=len(train_ids))
    if not idx.is_trained:
        if len(train_ids) < getattr(idx, "nlist", 1):
            raise HefeatError(f"{n} vectors are too few to train a {kind} index; use --index flat")
        idx.train(_read_rows(store, extraction_id, ids, train_ids, metric))
    train_s = time.perf_counter() - t0
    exact = _ExactTopK(Q, k, metric)
    bar = tqdm(total=n, disable=not progress, desc=f"index {iid}", unit="vec")
    for start, V in _stream(store, extraction_id, ids, metric):
        idx.add(V)  # faiss ids are insertion order = global ids
        exact.update(V, start)
        bar.update(len(V))
    bar.close()
    build_s = time.perf_counter() - t0
    t = time.perf_counter()
    _, approx = _search(store, {"type": kind, "extraction_id": extraction_id, "metric": metric}, idx, ids, Q, k)
    query_ms = (time.perf_counter() - t) / max(len(Q), 1) * 1000
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(approx, exact.ids, strict=True)]))
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / layout.INDEX_FILE) as tmp:
        faiss.write_index(idx, str(tmp))
    write_parquet(ids.to_frame(), d / layout.INDEX_OFFSETS)
    meta = {"index_id": iid, "extraction_id": extraction_id, "type": kind, "metric": metric, "n_vectors": n,
            "dim": dim, "recall_at_10": recall, "recall_queries": int(len(Q)), "build_seconds": round(build_s, 3),
            "train_seconds": round(train_s, 3), "query_ms": round(query_ms, 4), "nlist": getattr(idx, "nlist", None),
            "data_fingerprint": fp, "params": params, "created": timestamp()}
    write_json(d / layout.INDEX_META, meta)
    return {**meta, "cached": False}


def _resolve_index(store: Store, extraction_id: str | None, index_id: str | None) -> dict:
    """The index asked for, or the extraction's newest one; an index over older data is refused, never used."""
    if index_id:
        p = layout.index_meta_path(store.root, index_id)
        if not p.exists():
            raise HefeatError(f"No index {index_id!r} in the store; build one with hefeat neighbors build")
        meta = read_json(p)
        if extraction_id and meta["extraction_id"] != extraction_id:
            raise HefeatError(f"Index {index_id} was built for extraction {meta['extraction_id']}, not {extraction_id}")
        if meta.get("data_fingerprint") != extraction_fingerprint(store, meta["extraction_id"]):
            raise HefeatError(f"Index {index_id} was built before extraction {meta['extraction_id']}'s slides changed; "
                              f"rebuild it: hefeat neighbors build --extraction {meta['extraction_id']}")
        return meta
    store.extraction(extraction_id)  # an unknown id (or a tiling id) is said as such, not as a missing index
    rows = store.sql("SELECT index_id FROM indexes WHERE extraction_id = ? ORDER BY created DESC", [extraction_id])
    if rows.empty:
        raise HefeatError(f"No neighbour index for extraction {extraction_id}; run: hefeat neighbors build --extraction {extraction_id}")
    fp = extraction_fingerprint(store, extraction_id)
    for iid in rows["index_id"]:
        meta = read_json(layout.index_meta_path(store.root, iid))
        if meta.get("data_fingerprint") == fp:
            return meta
    raise HefeatError(f"The neighbour indexes of extraction {extraction_id} were built before its slides changed; "
                      f"rebuild: hefeat neighbors build --extraction {extraction_id}")


def load_index(store: Store, meta: dict):
    """The faiss index and its TileIds (global id -> slide, tile); cached while the files are unchanged.

    IVF indexes are memory-mapped, so a query process does not read the whole index first.
    """
    p = layout.index_file_path(store.root, meta["index_id"])
    return _load_index_files(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_index_files(path: str, _mtime_ns: int):
    import faiss

    try:
        idx = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # index types without a memory-mapped reader
        idx = faiss.read_index(path)
    off = layout.index_offsets_path(Path(path))
    if not off.exists():
        raise HefeatError(f"Index {Path(path).parent.name} was built by an older hefeat (no offsets); rebuild it "
                          "with hefeat neighbors build --force")
    return idx, TileIds.from_frame(pd.read_parquet(off))


def _keys(ids: TileIds, global_ids: np.ndarray) -> pd.DataFrame:
    """(slide_id, tile_id) rows of global ids."""
    return ids.keys(global_ids)[["slide_id", "tile_id"]]


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
        try:
            ids.global_id(sid, int(tid))
        except HefeatError:
            raise HefeatError(f"Tile {sid}:{tid} does not exist in extraction {eid}") from None
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
        qid = query_id({"index": meta["index_id"], "tile": tile, "image": image, "slide": slide, "k": k,
                        "x": exclude_same_slide, "p": exclude_same_patient, "self": include_self})
        out = res.assign(query_id=qid, index_id=meta["index_id"])
        write_parquet(out, layout.index_query_path(store.root, meta["index_id"], qid))
        res.attrs["query_id"] = qid
    return res


def latent_vs_physical(store: Store, extraction_id: str, *, n: int = 500, seed: int = 0, index_id: str | None = None) -> dict:
    """ST-Net's check: how often a tile's nearest latent neighbour (not itself) is a physically adjacent tile."""
    meta = _resolve_index(store, extraction_id, index_id)
    idx, ids = load_index(store, meta)
    tid = store.extraction(extraction_id)["tiling_id"]
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), min(n, len(ids)), replace=False))
    Q = _read_rows(store, extraction_id, ids, pick, meta["metric"])
    _, nn = _search(store, meta, idx, ids, Q, 2)
    nb = np.where(nn[:, 0] == pick, nn[:, 1], nn[:, 0])
    a, b = ids.keys(pick), ids.keys(nb)
    grid = pd.concat([store.tiles(tid, s)[["tile_id", "row", "col"]].assign(slide_id=s)
                      for s in sorted(set(a["slide_id"]) | set(b["slide_id"]))], ignore_index=True)
    a = a.merge(grid, on=["slide_id", "tile_id"], how="left")
    b = b.merge(grid, on=["slide_id", "tile_id"], how="left")
    same = (a["slide_id"] == b["slide_id"]).to_numpy()
    adj = same & ((a["row"] - b["row"]).abs() <= 1).to_numpy() & ((a["col"] - b["col"]).abs() <= 1).to_numpy()
    return {"n_queries": len(pick), "adjacent_share": float(adj.mean()), "same_slide_share": float(same.mean())}
