"""UMAP of a store's embeddings (PCA first, k-means clusters alongside), stored for SQL and the explorer.

A UMAP's id hashes its parameters AND the fingerprint of the extraction's data, so adding or
re-extracting a slide gives a new UMAP; a stored one is reported as cached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.features import feature_offsets, read_global_rows
from hefeat.store.ids import extraction_fingerprint, umap_id

META_KEY = b"hefeat.umap"


def sample_tiles(store: Store, eid: str, n: int | None, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A seeded sample of (slide_id, tile_id) rows and their embeddings, read slide by slide."""
    fi = feature_offsets(store, eid)
    total = int(fi["n_tiles"].sum())
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n or total, total), replace=False))
    slide = np.searchsorted(fi["offset"].to_numpy(), pick, side="right") - 1
    rows = pd.DataFrame({"slide_id": fi["slide_id"].to_numpy()[slide], "tile_id": pick - fi["offset"].to_numpy()[slide]})
    return rows, read_global_rows(store, eid, fi, pick)


def write_umap(store: Store, umap_id: str, rows: pd.DataFrame, meta: dict) -> None:
    """Write UMAP rows (slide_id, tile_id, umap_x, umap_y, cluster) with their provenance, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hefeat.store.atomic import atomic_path

    df = rows.reset_index(drop=True)
    df.insert(0, "point", np.arange(len(df), dtype=np.int64))
    df.insert(0, "extraction_id", meta["extraction_id"])
    df.insert(0, "umap_id", umap_id)
    t = pa.Table.from_pandas(df, preserve_index=False)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(store.umap_path(umap_id)) as tmp:
        pq.write_table(t, tmp, compression="zstd")


def umap_info(store: Store, umap_id: str) -> dict:
    """Provenance of a stored UMAP, and whether the extraction's data changed since (stale)."""
    import pyarrow.parquet as pq

    p = store.umap_path(umap_id)
    if not p.exists():
        raise HefeatError(f"No UMAP {umap_id!r} in the store; compute one with hefeat umap --extraction <eid>")
    raw = (pq.read_schema(p).metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {"umap_id": umap_id}
    if "fingerprint" in meta:
        try:
            meta["stale"] = extraction_fingerprint(store, meta["extraction_id"]) != meta["fingerprint"]
        except HefeatError:
            meta["stale"] = True
    return meta


def list_umaps(store: Store, extraction_id: str) -> list[dict]:
    """Stored UMAPs of an extraction, newest first, each with its provenance and staleness."""
    out = []
    for uid in layout.known_umaps(store.root):
        info = umap_info(store, uid)
        if info.get("extraction_id") == extraction_id:
            out.append(info)
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def run_umap(store: Store, extraction_id: str, *, sample: int | None = 100_000, pca: int | None = 50, seed: int = 0,
             n_neighbors: int = 15, min_dist: float = 0.1, clusters: int = 8, force: bool = False) -> dict:
    """Compute (or find) a UMAP of the extraction; coordinates go to umaps/ (the `umap` view)."""
    from hefeat.store.runs import timestamp

    for name, v, lo in (("sample", sample, 5), ("pca", pca, 2), ("n_neighbors", n_neighbors, 2), ("clusters", clusters, 1)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < lo):
            raise HefeatError(f"{name} must be an integer >= {lo} (got {v!r})")
    if not 0 <= float(min_dist) <= 1:
        raise HefeatError(f"min_dist must be in [0, 1] (got {min_dist!r})")
    fp = extraction_fingerprint(store, extraction_id)
    params = {"extraction_id": extraction_id, "sample": sample, "pca": pca, "seed": seed,
              "n_neighbors": n_neighbors, "min_dist": min_dist, "clusters": clusters}
    uid = umap_id(params, {"features": fp})
    if store.umap_path(uid).exists() and not force:
        info = umap_info(store, uid)
        return {**info, "umap_id": uid, "cached": True}
    t0 = time.perf_counter()
    rows, X = sample_tiles(store, extraction_id, sample, seed)
    if len(X) < 5:
        raise HefeatError(f"UMAP needs at least 5 tiles, the extraction has {len(X)}")
    if pca and pca < X.shape[1]:
        from sklearn.decomposition import PCA

        X = PCA(n_components=min(pca, len(X) - 1), random_state=seed).fit_transform(X)
    from sklearn.cluster import KMeans

    from hefeat.explore.umap_embed import umap_layout

    emb, knn = umap_layout(X, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    rows["umap_x"], rows["umap_y"] = emb[:, 0].astype(np.float32), emb[:, 1].astype(np.float32)
    rows["cluster"] = KMeans(n_clusters=min(clusters, len(X)), n_init=3, random_state=seed).fit_predict(X).astype(np.int16)
    ext = store.extraction(extraction_id)
    meta = {"umap_id": uid, **params, "fingerprint": fp, "n": len(rows), "n_slides": int(rows["slide_id"].nunique()),
            "neighbours": knn,
            "tiling_id": ext["tiling_id"], "encoder": ext.get("encoder"), "layer": ext.get("layer"),
            "seconds": round(time.perf_counter() - t0, 2), "created": timestamp()}
    write_umap(store, uid, rows, meta)
    return {**meta, "stale": False, "cached": False}


def describe(info: dict) -> str:
    """What a UMAP shows, in words (for titles): encoder, tiles, slides."""
    enc = info.get("encoder") or "features"
    if info.get("layer"):
        enc += f" {info['layer']}"
    return f"Tile embeddings ({enc}) of {info.get('n', '?'):,} tiles from {info.get('n_slides', '?')} slides"


def plot_umap(store: Store, umap_id: str, out: str | Path, *, color: str | None = None, thumbnails: int = 0,
              title: str | None = None) -> dict:
    """PNG scatter of a stored UMAP coloured by a value spec (see explore.values); optional linked tiles."""
    from hefeat.explore.values import values_for
    from hefeat.figures.umap import umap_scatter

    info = umap_info(store, umap_id)
    rows = pd.read_parquet(store.umap_path(umap_id))
    tid = info.get("tiling_id") or store.extraction(rows["extraction_id"].iloc[0])["tiling_id"]
    values, label = None, ""
    if color:
        values, val = values_for(store, color, rows, tiling_id=tid)
        label = val.title
    thumbs = _thumbnails(store, rows, thumbnails) if thumbnails else []
    what = describe(info)
    sub = (f"UMAP {umap_id} of extraction {info.get('extraction_id')} on tiling {tid}; PCA {info.get('pca')}, "
           f"n_neighbors {info.get('n_neighbors')}, min_dist {info.get('min_dist')}, seed {info.get('seed')}")
    if info.get("stale"):
        sub += " — STALE: the extraction's data changed since"
    r = umap_scatter(rows[["umap_x", "umap_y"]].to_numpy(), values,
                     title=title or (what + (f", coloured by {label}" if color else "")),
                     color_label=label, subtitle=sub, thumbnails=thumbs, out=out)
    return {"umap_id": umap_id, "out": str(out), "points": len(rows), "color": r["color"], "label": label,
            "stale": bool(info.get("stale", False))}


def _thumbnails(store: Store, rows: pd.DataFrame, n: int) -> list[tuple[int, np.ndarray]]:
    """Tile images of the points nearest to k-means centres of the 2-D map."""
    from sklearn.cluster import KMeans

    from hefeat.explore.tiles import tile_image

    eid = rows["extraction_id"].iloc[0]
    xy = rows[["umap_x", "umap_y"]].to_numpy()
    km = KMeans(n_clusters=min(n, len(rows)), n_init=3, random_state=0).fit(xy)
    out = []
    for c in km.cluster_centers_:
        i = int(np.argmin(((xy - c) ** 2).sum(1)))
        out.append((i, tile_image(store, rows["slide_id"].iloc[i], int(rows["tile_id"].iloc[i]), extraction_id=eid)))
    return out


def cluster_purity(X: np.ndarray, labels: np.ndarray, k: int = 2, seed: int = 0) -> float:
    """k-means on X, each cluster votes its majority label; share of points matching (ST-Net's purity)."""
    from sklearn.cluster import KMeans

    lab = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)
    labels = np.asarray(labels)
    hit = sum(pd.Series(labels[lab == c]).value_counts().iloc[0] for c in np.unique(lab))
    return float(hit / len(labels))


def umap_purity(store: Store, umap_id: str, label: str, k: int = 2) -> float:
    """2-means (k-means) purity of a stored UMAP against labels given by a value spec (e.g. a clinical column)."""
    from hefeat.explore.values import values_for

    info = umap_info(store, umap_id)
    rows = pd.read_parquet(store.umap_path(umap_id))
    lab, _ = values_for(store, label, rows, tiling_id=info.get("tiling_id") or store.extraction(info["extraction_id"])["tiling_id"])
    ok = lab.notna().to_numpy()
    if not ok.any():
        raise HefeatError("The purity labels match no tile of this UMAP")
    return cluster_purity(rows.loc[ok, ["umap_x", "umap_y"]].to_numpy(), lab[ok].astype(str).to_numpy(), k=k)
