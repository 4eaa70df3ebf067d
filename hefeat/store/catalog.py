"""The store directory and its DuckDB catalog.

Files are the source of truth. The DuckDB file holds what users ingest (slides, expression,
clinical data, spots); everything workers produce (tilings, tiles, status rows, extractions,
models, predictions, runs) lives in files and is exposed as views created on each connection,
so workers never need the catalog's write lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store.atomic import read_json, write_json
from hefeat.store.ids import check_id

DEFAULT_STORE = "stores/default"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS slides (
        slide_id VARCHAR PRIMARY KEY, patient_id VARCHAR, site VARCHAR, path VARCHAR,
        fingerprint VARCHAR, vendor VARCHAR, width BIGINT, height BIGINT, level_count INTEGER,
        level_dimensions VARCHAR, mpp_x DOUBLE, mpp_y DOUBLE, mpp_source VARCHAR,
        objective_power DOUBLE, ingested_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS samples (
        dataset VARCHAR, sample_id VARCHAR, slide_id VARCHAR, patient_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS expression (
        dataset VARCHAR, sample_id VARCHAR, gene VARCHAR, value DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS spots (
        slide_id VARCHAR, spot_id VARCHAR, x DOUBLE, y DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS spot_counts (
        slide_id VARCHAR, spot_id VARCHAR, gene VARCHAR, count DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS ingests (
        kind VARCHAR, source VARCHAR, fingerprint VARCHAR, n_rows BIGINT, ingested_at TIMESTAMP)""",
]

# Empty shapes for file-backed views, so queries work before any file exists.
_EMPTY = {
    "tiles": "SELECT NULL::VARCHAR AS tiling_id, NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, NULL::BIGINT AS x, "
    "NULL::BIGINT AS y, NULL::DOUBLE AS size0, NULL::INTEGER AS \"row\", NULL::INTEGER AS col, NULL::FLOAT AS tissue_frac, "
    "NULL::FLOAT AS sharpness, NULL::FLOAT AS mean_r, NULL::FLOAT AS mean_g, NULL::FLOAT AS mean_b, "
    "NULL::FLOAT AS background_frac, NULL::FLOAT AS density WHERE false",
    "status": "SELECT NULL::VARCHAR AS stage, NULL::VARCHAR AS id, NULL::VARCHAR AS slide_id, NULL::VARCHAR AS state, "
    "NULL::VARCHAR AS reason, NULL::DOUBLE AS seconds, NULL::BIGINT AS n_tiles, NULL::DOUBLE AS tiles_per_s, "
    "NULL::VARCHAR AS finished_at WHERE false",
    "tilings": "SELECT NULL::VARCHAR AS tiling_id, NULL::DOUBLE AS mpp, NULL::INTEGER AS size, NULL::VARCHAR AS background, "
    "NULL::BOOLEAN AS spots, NULL::VARCHAR AS created WHERE false",
    "extractions": "SELECT NULL::VARCHAR AS extraction_id, NULL::VARCHAR AS tiling_id, NULL::VARCHAR AS encoder, "
    "NULL::INTEGER AS dim, NULL::VARCHAR AS created WHERE false",
    "models": "SELECT NULL::VARCHAR AS model_id, NULL::VARCHAR AS kind, NULL::VARCHAR AS extraction_id, "
    "NULL::VARCHAR AS created WHERE false",
    "predictions": "SELECT NULL::VARCHAR AS model_id, NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id WHERE false",
    "jobs": "SELECT NULL::VARCHAR AS job_id, NULL::VARCHAR AS task, NULL::VARCHAR AS status, "
    "NULL::VARCHAR AS backbone, NULL::VARCHAR AS created WHERE false",
    "runs": "SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS command, NULL::DOUBLE AS seconds WHERE false",
    "indexes": "SELECT NULL::VARCHAR AS index_id, NULL::VARCHAR AS extraction_id, NULL::VARCHAR AS type, "
    "NULL::BIGINT AS n_vectors, NULL::DOUBLE AS recall_at_10 WHERE false",
    "umap": "SELECT NULL::VARCHAR AS umap_id, NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, "
    "NULL::FLOAT AS umap_x, NULL::FLOAT AS umap_y WHERE false",
    "neighbors": "SELECT NULL::VARCHAR AS query_id, NULL::VARCHAR AS index_id, NULL::INTEGER AS rank, "
    "NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, NULL::FLOAT AS distance WHERE false",
}


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


class Store:
    """A hefeat store rooted at `root` (see the README for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.catalog_path = self.root / "catalog.duckdb"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike) -> Store:
        """Create (or open) the store directory and its catalog; idempotent."""
        store = cls(root)
        if store.root.exists() and not store.root.is_dir():
            raise HefeatError(f"Store path {store.root} is a file, not a directory. Choose another --store.")
        for sub in ("tiles", "features", "models", "predictions", "runs", "status", "indexes", "umaps"):
            (store.root / sub).mkdir(parents=True, exist_ok=True)
        with store.connect(write=True, views=False) as con:
            for stmt in SCHEMA:
                con.execute(stmt)
        return store

    def exists(self) -> bool:
        """Whether the store has been initialised."""
        return self.catalog_path.exists()

    def require(self) -> Store:
        """Raise a clear error if the store does not exist yet."""
        if self.root.exists() and not self.root.is_dir():
            raise HefeatError(f"Store path {self.root} is a file, not a directory. Choose another --store.")
        if not self.exists():
            raise HefeatError(f"No store at {self.root}. Create it with: hefeat init --store {self.root}")
        return self

    # -- connections ----------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, write: bool = False, views: bool = True, timeout: float = 60.0) -> Iterator:
        """A DuckDB connection to the catalog with the file-backed views; retries while locked."""
        import duckdb

        if not write:
            self.require()
        deadline = time.monotonic() + timeout
        while True:
            try:
                con = duckdb.connect(str(self.catalog_path), read_only=not write)
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    raise HefeatError(f"Cannot open the catalog {self.catalog_path}: {e}") from None
                time.sleep(0.2)
        try:
            if views:
                self._create_views(con)
            yield con
        finally:
            con.close()

    def _glob_view(self, con, name: str, pattern: Path, reader: str) -> None:
        if any(self.root.glob(str(pattern.relative_to(self.root)))):
            src = f"{reader}({_q(pattern)}, union_by_name=true, hive_partitioning=false)"
            con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM {src}")
        else:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {_EMPTY[name]}")

    def _create_views(self, con) -> None:
        r = self.root
        self._glob_view(con, "tiles", r / "tiles" / "tiling=*" / "slide=*.parquet", "read_parquet")
        self._glob_view(con, "tilings", r / "tiles" / "tiling=*" / "_tiling.json", "read_json_auto")
        self._glob_view(con, "status", r / "status" / "*" / "*.json", "read_json_auto")
        self._glob_view(con, "extractions", r / "features" / "extraction=*" / "_extraction.json", "read_json_auto")
        self._glob_view(con, "models", r / "models" / "*" / "index.json", "read_json_auto")
        self._glob_view(con, "predictions", r / "predictions" / "model=*" / "slide=*.parquet", "read_parquet")
        self._glob_view(con, "runs", r / "runs" / "*" / "run.json", "read_json_auto")
        self._glob_view(con, "jobs", r / "jobs" / "*" / "index.json", "read_json_auto")
        self._glob_view(con, "indexes", r / "indexes" / "*" / "index.json", "read_json_auto")
        self._glob_view(con, "umap", r / "umaps" / "umap=*.parquet", "read_parquet")
        self._glob_view(con, "neighbors", r / "indexes" / "*" / "queries" / "*.parquet", "read_parquet")
        con.execute(
            "CREATE OR REPLACE TEMP VIEW features_index AS SELECT id AS extraction_id, slide_id, n_tiles, "
            "path, dim FROM status WHERE stage = 'extraction' AND state = 'ok'"
            if self._has_col(con, "status", "path")
            else "CREATE OR REPLACE TEMP VIEW features_index AS SELECT NULL::VARCHAR AS extraction_id, "
            "NULL::VARCHAR AS slide_id, NULL::BIGINT AS n_tiles, NULL::VARCHAR AS path, NULL::INTEGER AS dim WHERE false"
        )

    @staticmethod
    def _has_col(con, view: str, col: str) -> bool:
        return col in [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]

    def sql(self, query: str, params: list | None = None) -> pd.DataFrame:
        """Run a SQL query over the catalog and views; returns a DataFrame."""
        import duckdb

        with self.connect() as con:
            try:
                return con.execute(query, params or []).df()
            except duckdb.Error as e:
                raise HefeatError(f"SQL failed: {str(e).splitlines()[0]}") from None

    # -- paths (the only place that formats store paths) ----------------------------------
    def tiling_dir(self, tiling_id: str) -> Path:
        """Folder of one tiling's per-slide Parquet files."""
        return self.root / "tiles" / f"tiling={tiling_id}"

    def tiles_path(self, tiling_id: str, slide_id: str) -> Path:
        """Tile metadata Parquet of one slide in one tiling."""
        return self.tiling_dir(tiling_id) / f"slide={check_id(slide_id)}.parquet"

    def extraction_dir(self, extraction_id: str) -> Path:
        """Folder of one extraction's per-slide HDF5 files."""
        return self.root / "features" / f"extraction={extraction_id}"

    def features_path(self, extraction_id: str, slide_id: str) -> Path:
        """Feature HDF5 of one slide in one extraction."""
        return self.extraction_dir(extraction_id) / f"{check_id(slide_id)}.h5"

    def aggregates_path(self, extraction_id: str) -> Path:
        """Consolidated slide table of one extraction: file identity, byte offsets and aggregates per slide."""
        return self.extraction_dir(extraction_id) / "_aggregates.h5"

    def status_dir(self, stage: str, run_key: str) -> Path:
        """Folder of per-slide status files of one stage (tiling/extraction) and id."""
        return self.root / "status" / f"{stage}={run_key}"

    def status_path(self, stage: str, run_key: str, slide_id: str) -> Path:
        """Status JSON of one slide for one stage and id."""
        return self.status_dir(stage, run_key) / f"{check_id(slide_id)}.json"

    def model_dir(self, model_id: str) -> Path:
        """Folder of one fitted model."""
        return self.root / "models" / check_id(model_id, "model_id")

    def predictions_path(self, model_id: str, slide_id: str) -> Path:
        """Per-slide predictions Parquet of one model."""
        return self.root / "predictions" / f"model={model_id}" / f"slide={check_id(slide_id)}.parquet"

    def index_dir(self, index_id: str) -> Path:
        """Folder of one neighbour index (faiss file, id map, provenance)."""
        return self.root / "indexes" / check_id(index_id, "index_id")

    def umap_path(self, umap_id: str) -> Path:
        """Parquet of one UMAP's coordinates."""
        return self.root / "umaps" / f"umap={check_id(umap_id, 'umap_id')}.parquet"

    def qc_thumbnail_path(self, tiling_id: str, slide_id: str) -> Path:
        """QC picture (thumbnail, mask outline, tiles) of one slide in one tiling."""
        return self.root / "reports" / f"qc-{tiling_id}" / f"{check_id(slide_id)}.png"

    def reports_dir(self, name: str) -> Path:
        """Folder for PNG reports (e.g. the demo's figures)."""
        d = self.root / "reports" / check_id(name, "report")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def job_dir(self, job_id: str) -> Path:
        """Folder of one fine-tuning job (recipe, folds, checkpoints, logs, registered encoder)."""
        return self.root / "jobs" / check_id(job_id, "job_id")

    def run_dir(self, run_id: str) -> Path:
        """Folder of one run's record."""
        return self.root / "runs" / run_id

    # -- registries -----------------------------------------------------------------------
    def read_status(self, stage: str, run_key: str, slide_id: str) -> dict | None:
        """Status row of one slide, or None if it never ran."""
        p = self.status_path(stage, run_key, slide_id)
        return read_json(p) if p.exists() else None

    def write_status(self, stage: str, run_key: str, slide_id: str, row: dict) -> None:
        """Write a slide's status row atomically."""
        write_json(self.status_path(stage, run_key, slide_id), {"stage": stage, "id": run_key, "slide_id": slide_id, **row})

    def slides(self, slide_ids: list[str] | None = None) -> pd.DataFrame:
        """The slides table (optionally only some slides), ordered by slide_id."""
        df = self.sql("SELECT * FROM slides ORDER BY slide_id")
        if slide_ids:
            missing = sorted(set(slide_ids) - set(df["slide_id"]))
            if missing:
                raise HefeatError(f"Unknown slide ids: {', '.join(missing[:10])}. See: hefeat sql \"SELECT slide_id FROM slides\"")
            df = df[df["slide_id"].isin(slide_ids)].reset_index(drop=True)
        return df

    def tiling(self, tiling_id: str) -> dict:
        """Parameters of a tiling; clear error if unknown."""
        p = self.tiling_dir(tiling_id) / "_tiling.json"
        if not p.exists():
            known = [d.name.split("=", 1)[1] for d in (self.root / "tiles").glob("tiling=*")]
            raise HefeatError(f"Tiling {tiling_id!r} does not exist in {self.root}. Known: {', '.join(known) or 'none (run hefeat tile)'}")
        return read_json(p)

    def extraction(self, extraction_id: str) -> dict:
        """Provenance of an extraction; clear error if unknown."""
        p = self.extraction_dir(extraction_id) / "_extraction.json"
        if not p.exists():
            known = [d.name.split("=", 1)[1] for d in (self.root / "features").glob("extraction=*")]
            raise HefeatError(f"Extraction {extraction_id!r} does not exist in {self.root}. Known: {', '.join(known) or 'none (run hefeat extract)'}")
        return read_json(p)

    def tiles(self, tiling_id: str, slide_id: str) -> pd.DataFrame:
        """Tile metadata of one slide in one tiling."""
        return pd.read_parquet(self.tiles_path(tiling_id, slide_id))


def open_store(root: str | os.PathLike | None = None) -> Store:
    """The store at `root`, $HEFEAT_STORE, or stores/default (must exist)."""
    return Store(root or os.environ.get("HEFEAT_STORE", DEFAULT_STORE)).require()
