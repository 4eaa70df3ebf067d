"""UMAP of a store's embeddings (PCA first), stored for SQL, plotted coloured by any SQL expression."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.explore.plots import is_categorical, pyplot
from hefeat.store.catalog import Store
from hefeat.store.features import feature_offsets, read_global_rows
from hefeat.store.ids import content_id
from hefeat.store.tables import write_parquet


def sample_tiles(store: Store, eid: str, n: int | None, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A seeded sample of (slide_id, tile_id) rows and their embeddings, read slide by slide."""
    fi = feature_offsets(store, eid)
    total = int(fi["n_tiles"].sum())
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n or total, total), replace=False))
    slide = np.searchsorted(fi["offset"].to_numpy(), pick, side="right") - 1
    rows = pd.DataFrame({"slide_id": fi["slide_id"].to_numpy()[slide], "tile_id": pick - fi["offset"].to_numpy()[slide]})
    return rows, read_global_rows(store, eid, fi, pick)


def run_umap(store: Store, extraction_id: str, *, sample: int | None = 100_000, pca: int | None = 50, seed: int = 0,
             n_neighbors: int = 15, min_dist: float = 0.1, force: bool = False) -> dict:
    """Compute (or find) a UMAP of the extraction; coordinates go to umaps/ (the `umap` view)."""
    params = {"extraction_id": extraction_id, "sample": sample, "pca": pca, "seed": seed,
              "n_neighbors": n_neighbors, "min_dist": min_dist}
    uid = content_id(params, prefix="u")
    path = store.umap_path(uid)
    if path.exists() and not force:
        df = pd.read_parquet(path)
        return {"umap_id": uid, "n": len(df), "cached": True, **params}
    t0 = time.perf_counter()
    rows, X = sample_tiles(store, extraction_id, sample, seed)
    if len(X) < 5:
        raise HefeatError(f"UMAP needs at least 5 tiles, the extraction has {len(X)}")
    if pca and pca < X.shape[1]:
        from sklearn.decomposition import PCA

        X = PCA(n_components=min(pca, len(X) - 1), random_state=seed).fit_transform(X)
    import umap

    emb = umap.UMAP(n_neighbors=min(n_neighbors, len(X) - 1), min_dist=min_dist, random_state=seed).fit_transform(X)
    rows["umap_x"], rows["umap_y"] = emb[:, 0].astype(np.float32), emb[:, 1].astype(np.float32)
    rows.insert(0, "extraction_id", extraction_id)
    rows.insert(0, "umap_id", uid)
    write_parquet(rows, path)
    return {"umap_id": uid, "n": len(rows), "cached": False, "seconds": round(time.perf_counter() - t0, 2), **params}


def color_values(store: Store, umap_rows: pd.DataFrame, color_sql: str | None) -> pd.Series | None:
    """Join the result of a colour query (slide_id, tile_id, color) onto UMAP rows."""
    if not color_sql:
        return None
    c = store.sql(color_sql)
    if "color" not in c.columns or "tile_id" not in c.columns:
        raise HefeatError("The --color query must return tile_id and color columns (and slide_id across slides)")
    if c.empty:
        raise HefeatError("The --color query returned no rows")
    key = ["slide_id", "tile_id"] if "slide_id" in c.columns else ["tile_id"]
    m = umap_rows.merge(c[key + ["color"]].drop_duplicates(key), on=key, how="left")
    if m["color"].isna().all():
        raise HefeatError("No row of the --color query matches a tile in this UMAP (check slide_id/tile_id)")
    return m["color"]


def plot_umap(store: Store, umap_id: str, out: str | Path, *, color_sql: str | None = None,
              thumbnails: int = 0, title: str | None = None) -> dict:
    """PNG scatter of a stored UMAP, coloured by a SQL query; optional tile thumbnails at cluster centres."""
    path = store.umap_path(umap_id)
    if not path.exists():
        raise HefeatError(f"No UMAP {umap_id!r}; run hefeat umap first")
    rows = pd.read_parquet(path)
    col = color_values(store, rows, color_sql)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    kind = "none"
    if col is None:
        ax.scatter(rows["umap_x"], rows["umap_y"], s=4, c="#555")
    elif is_categorical(col):
        kind = "categorical"
        for v in sorted(col.dropna().unique(), key=str):
            m = (col == v).to_numpy()
            ax.scatter(rows.loc[m, "umap_x"], rows.loc[m, "umap_y"], s=5, label=str(v))
        ax.legend(markerscale=3, fontsize=8, loc="best")
    else:
        kind = "continuous"
        sc = ax.scatter(rows["umap_x"], rows["umap_y"], s=5, c=pd.to_numeric(col), cmap="viridis")
        fig.colorbar(sc, ax=ax)
    if thumbnails:
        _thumbnails(store, rows, ax, thumbnails)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or f"UMAP {umap_id}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"umap_id": umap_id, "out": str(out), "points": len(rows), "color": kind}


def _thumbnails(store: Store, rows: pd.DataFrame, ax, n: int) -> None:
    """Tile images at the points nearest to k-means centres of the UMAP."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from sklearn.cluster import KMeans

    from hefeat.explore.tiles import tile_image

    eid = rows["extraction_id"].iloc[0]
    xy = rows[["umap_x", "umap_y"]].to_numpy()
    km = KMeans(n_clusters=min(n, len(rows)), n_init=1, random_state=0).fit(xy)
    for c in km.cluster_centers_:
        i = int(np.argmin(((xy - c) ** 2).sum(1)))
        img = tile_image(store, rows["slide_id"].iloc[i], int(rows["tile_id"].iloc[i]), extraction_id=eid)
        ax.add_artist(AnnotationBbox(OffsetImage(img, zoom=0.25), xy[i], frameon=True, pad=0.1))


def cluster_purity(X: np.ndarray, labels: np.ndarray, k: int = 2, seed: int = 0) -> float:
    """k-means on X, each cluster votes its majority label; share of points matching (ST-Net's purity)."""
    from sklearn.cluster import KMeans

    lab = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)
    labels = np.asarray(labels)
    hit = sum(pd.Series(labels[lab == c]).value_counts().iloc[0] for c in np.unique(lab))
    return float(hit / len(labels))


def umap_purity(store: Store, umap_id: str, label_sql: str, k: int = 2) -> float:
    """2-means (k-means) purity of a stored UMAP against labels from SQL (slide_id, tile_id, label)."""
    rows = pd.read_parquet(store.umap_path(umap_id))
    lab = store.sql(label_sql)
    if not {"tile_id", "label"} <= set(lab.columns):
        raise HefeatError("The purity query must return slide_id, tile_id and label")
    m = rows.merge(lab, on=[c for c in ("slide_id", "tile_id") if c in lab.columns], how="inner")
    if m.empty:
        raise HefeatError("The purity query matches no tile of this UMAP")
    return cluster_purity(m[["umap_x", "umap_y"]].to_numpy(), m["label"].to_numpy(), k=k)
