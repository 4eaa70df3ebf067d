"""The store directory and its DuckDB catalog.

Files are the source of truth. The DuckDB file holds what users ingest (slides, expression,
clinical data, spots); everything workers produce (tiles, commit records, features, models,
predictions, runs) lives in files that workers write without the catalog's lock.

Queries run on an in-memory DuckDB database that a Store binds once: the catalog is attached
read-only for the duration of each query (so a long-lived Store never blocks another process's
ingest), commit records come from their compacted table (`records.load_status`), per-slide Parquet
families from their compacted parts plus the few files not compacted yet (`compact`), and every
view has a fixed schema, so binding never reads thousands of files. The views are re-bound only
when the store changed (a stat of its folders tells), and the connection is a sandbox
(`sandbox.py`): ad-hoc SQL reads, never writes.

Over 600 lines: the Store is the one object every layer holds; its views, their binding and the
ingest tables stay in one class so the binding rules (what invalidates a view) are read in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import compact, layout, records
from hefeat.store.atomic import read_json
from hefeat.store.compact import scan, sql_str
from hefeat.store.ids import check_id
from hefeat.store.sandbox import check_read_only, lock_down
from hefeat.store.schema import (
    CATALOG_DDL,
    CATALOG_TABLES,
    EMPTY_VIEWS,
    EXPRESSION_VIEW,
    FORMAT_VERSION,
    SAMPLES_VIEW,
    STATUS_FIELDS,
)

DEFAULT_STORE = "stores/default"
_CAT = "hefeat_catalog"


def db_error(e: Exception, what: str) -> HefeatError:
    """A one-line HefeatError for a DuckDB or OS error while doing `what`."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = msg.lower()
    if "no space left" in low:
        return HefeatError(f"{what}: the disk is full ({msg}). Free space and run the command again; nothing was lost.")
    if "read-only" in low or "permission denied" in low:
        return HefeatError(f"{what}: the store is not writable ({msg}).")
    return HefeatError(f"{what}: {msg}")


def _flat(rec: dict) -> dict:
    """A JSON record with nested values as JSON text (so one table can hold records of any shape)."""
    return {k: json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v for k, v in rec.items()}


def _frame(cur, statement, params: list) -> pd.DataFrame:
    return cur.execute(statement, params).df()


def _arrow(cur, statement, params: list):
    """The result as a pyarrow Table, without the extra copy of a DB-API fetch."""
    rel = cur.sql(statement.query, params=params or None)
    return (getattr(rel, "to_arrow_table", None) or rel.arrow)()


class Store:
    """A hefeat store rooted at `root` (see `layout.py` for the files)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.catalog_path = layout.catalog_path(self.root)
        self._lock = threading.RLock()
        self._db = None
        self._token: tuple | None = None
        self._attached = 0
        self._tiling_sql: dict[str, str] = {}
        self._status = records.StatusSnapshot()
        self._catalog_tables: set[str] = set()
        self.broken: list[str] = []
        #: The read plan of every per-slide Parquet family, as the views were last bound.
        self.plans: dict[str, compact.Plan] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a Store travels to worker processes as its path
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike) -> Store:
        """Create (or open, or upgrade) the store directory and its catalog; idempotent."""
        store = cls(root)
        if store.root.exists() and not store.root.is_dir():
            raise HefeatError(f"Store path {store.root} is a file, not a directory. Choose another --store.")
        try:
            for sub in layout.FOLDERS:
                (store.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise db_error(e, f"Cannot create the store at {store.root}") from None
        with store.connect(write=True) as con:
            for stmt in CATALOG_DDL:
                con.execute(stmt)
            from hefeat.store.migrate import migrate

            migrate(con)
            con.execute("INSERT OR REPLACE INTO store_meta VALUES ('format_version', ?)", [str(FORMAT_VERSION)])
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

    def writable(self) -> bool:
        """Whether this process may write files into the store."""
        return os.access(self.root, os.W_OK) and os.access(self.root / layout.COMPACT, os.W_OK)

    # -- the write connection -------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, write: bool = False, timeout: float = 60.0, **_ignored) -> Iterator:
        """A DuckDB connection to the catalog file itself (tables only, no views); retries while locked.

        Use `sql()` to query; this is for ingest (write=True). The transaction is committed when the
        block ends normally and rolled back on any error, so a failed ingest leaves the catalog as it was.
        """
        import duckdb

        if not write:
            self.require()
        with self._lock:
            self._detach_now()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    con = duckdb.connect(str(self.catalog_path), read_only=not write)
                    break
                except duckdb.Error as e:
                    busy = "lock" in str(e).lower() or "conflict" in str(e).lower()
                    if not busy or time.monotonic() > deadline:
                        raise db_error(e, f"Cannot open the catalog {self.catalog_path}") from None
                    time.sleep(0.2)
                except OSError as e:
                    raise db_error(e, f"Cannot open the catalog {self.catalog_path}") from None
            try:
                if write:
                    con.execute("BEGIN TRANSACTION")
                yield con
                if write:
                    con.execute("COMMIT")
            except duckdb.Error as e:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise db_error(e, "Catalog update failed (nothing was changed)") from None
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.close()
                self._token = None

    # -- the query database ----------------------------------------------------------------
    def close(self) -> None:
        """Drop the query database (it is rebuilt on the next query)."""
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
            self._db, self._token, self._attached = None, None, 0

    def _state_token(self) -> tuple:
        """Cheap summary of everything the views depend on (stats of folders and the catalog)."""
        out: list = []

        def st(p: Path) -> None:
            try:
                s = p.stat()
                out.append((str(p), s.st_mtime_ns, s.st_size))
            except OSError:
                out.append((str(p), None))

        st(self.catalog_path)
        st(self.catalog_path.with_name(self.catalog_path.name + ".wal"))
        for folder in (layout.STATUS, layout.TILES, layout.FEATURES, layout.MODELS, layout.PREDICTIONS,
                       layout.INDEXES, layout.UMAPS, layout.RUNS, layout.JOBS):
            base = self.root / folder
            st(base)
            with contextlib.suppress(OSError):
                for e in os.scandir(base):
                    if e.is_dir():
                        st(Path(e.path))
                        if folder == layout.INDEXES:
                            st(Path(e.path) / "queries")
        for fam in (records.FAMILY, *self.plans):
            st(layout.compact_manifest(self.root, fam))
        return tuple(out)

    def _attach(self) -> None:
        if self._attached == 0:
            self._db.execute(f"ATTACH {sql_str(self.catalog_path)} AS {_CAT} (READ_ONLY)")
        self._attached += 1

    def _detach(self) -> None:
        self._attached -= 1
        if self._attached == 0 and self._db is not None:
            self._db.execute(f"DETACH {_CAT}")

    def _detach_now(self) -> None:
        if self._attached and self._db is not None:
            with contextlib.suppress(Exception):
                self._db.execute(f"DETACH {_CAT}")
            self._attached = 0

    @contextlib.contextmanager
    def session(self) -> Iterator[Store]:
        """Keep the catalog attached for a block of queries (e.g. `hefeat status`)."""
        import duckdb

        self.require()
        with self._lock:
            try:
                self._bind()
                self._attach()
            except duckdb.Error as e:
                raise db_error(e, f"Cannot read the catalog {self.catalog_path}") from None
        try:
            yield self
        finally:
            with self._lock, contextlib.suppress(Exception):
                self._detach()

    def _bind(self) -> None:
        """(Re)create the views when the store changed since they were bound."""
        import duckdb

        token = self._state_token()
        if self._db is not None and token == self._token:
            return
        if self._db is None:
            self._db = duckdb.connect(":memory:", config={"threads": 2})
            self._db.execute("SET parquet_metadata_cache = true")
            lock_down(self._db, [str(self.root)])
        was = self._attached
        if was == 0:
            self._attach()
        try:
            self._create_views()
        finally:
            if was == 0:
                self._detach()
        self._token = self._state_token()

    def refresh(self) -> None:
        """Re-bind the views now (they are re-bound anyway when the store's folders change)."""
        with self._lock:
            self._token = None

    # -- views ----------------------------------------------------------------------------
    def _view(self, name: str, select: str | None) -> None:
        self._db.execute(f"CREATE OR REPLACE VIEW {name} AS {select or EMPTY_VIEWS[name]}")

    def _table(self, name: str, df: pd.DataFrame) -> None:
        if df.empty:
            self._db.execute(f"CREATE OR REPLACE TABLE {name} AS {EMPTY_VIEWS[name]}")
            return
        self._db.register("_hefeat_src", df)
        try:
            self._db.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _hefeat_src")
        finally:
            self._db.unregister("_hefeat_src")

    def _json_records(self, paths: list[Path]) -> pd.DataFrame:
        rows = []
        for p in paths:
            try:
                rows.append(_flat(read_json(p)))
            except (OSError, ValueError):
                continue
        return pd.DataFrame(rows)

    def _create_views(self) -> None:
        db = self._db
        have = {r[0] for r in db.execute(
            f"SELECT table_name FROM duckdb_tables() WHERE database_name = '{_CAT}'").fetchall()}
        version = None
        if "store_meta" in have:
            v = db.execute(f"SELECT value FROM {_CAT}.store_meta WHERE key = 'format_version'").fetchone()
            version = int(v[0]) if v else None
        if version is None or version < FORMAT_VERSION:
            raise HefeatError(f"The store {self.root} was written by an older hefeat (format {version or 1}); "
                              f"upgrade it in place with: hefeat init --store {self.root}")
        self._catalog_tables = have
        for t in (*CATALOG_TABLES, "clinical"):
            self._view(t, f"SELECT * FROM {_CAT}.{t}" if t in have else None)
        if {"samples", "slides"} <= have:  # sample -> slide and patient resolved when read
            self._view("samples", SAMPLES_VIEW.format(cat=_CAT))
        self._view("expression", EXPRESSION_VIEW)

        # Commit records -> status, features_index. Reading never writes: compaction is the writers' step.
        self._status = records.load_status(self.root, write=False)
        arrow = self._status.to_arrow()
        db.register("_hefeat_status", arrow)
        try:
            cols = ", ".join(f'CAST("{k}" AS {t}) AS "{k}"' for k, t in STATUS_FIELDS.items())
            db.execute(f"CREATE OR REPLACE TABLE status AS SELECT {cols} FROM _hefeat_status")
        finally:
            db.unregister("_hefeat_status")
        root = sql_str(str(self.root) + "/")
        db.execute(
            "CREATE OR REPLACE VIEW features_index AS SELECT id AS extraction_id, slide_id, n_tiles, "
            f"CASE WHEN path LIKE '/%' THEN path ELSE {root} || path END AS path, dim, digest "
            "FROM status WHERE stage = 'extraction' AND state = 'ok'")

        # Small JSON families, read whole (explicit columns, no schema sniffing).
        tiling_ids = layout.known_ids(self.root, layout.TILES, "tiling")
        tl = self._json_records([layout.tiling_meta_path(self.root, t) for t in tiling_ids])
        self._table("tilings", tl)
        ex_ids = layout.known_ids(self.root, layout.FEATURES, "extraction")
        self._table("extractions", self._json_records([layout.extraction_meta_path(self.root, e) for e in ex_ids]))
        models = layout.known_ids(self.root, layout.MODELS)
        self._table("models", self._json_records([layout.model_dir(self.root, m) / layout.MODEL_INDEX for m in models
                                                  if (layout.model_dir(self.root, m) / layout.MODEL_INDEX).exists()]))
        jobs = [layout.job_dir(self.root, j) / layout.JOB_INDEX for j in layout.known_ids(self.root, layout.JOBS)]
        self._table("jobs", self._json_records([p for p in jobs if p.exists()]))
        runs = layout.known_ids(self.root, layout.RUNS)
        self._table("runs", self._json_records([layout.run_dir(self.root, r) / layout.RUN_RECORD for r in runs]))
        idx = layout.known_ids(self.root, layout.INDEXES)
        self._table("indexes", self._json_records([layout.index_dir(self.root, i) / layout.INDEX_META for i in idx
                                                   if (layout.index_dir(self.root, i) / layout.INDEX_META).exists()]))

        # Per-slide Parquet families: tiles per tiling, predictions per complete model.
        self._tiling_sql = {}
        preds = []
        self.broken = []
        self.plans = {}
        for fam, members in self._families(tiling_ids, models).items():
            pl = self.plans[fam] = compact.plan(self.root, fam, members)
            self.broken += [f"{fam}/{m}" for m in pl.broken]
            sel = pl.sql()
            if sel and fam.startswith("tiles="):
                self._tiling_sql[fam[6:]] = sel
            elif sel:
                preds.append(f"({sel})")
        self._view("tiles", " UNION ALL BY NAME ".join(f"({s})" for s in self._tiling_sql.values()) or None)
        self._view("predictions", " UNION ALL BY NAME ".join(preds) or None)

        umaps = sorted((self.root / layout.UMAPS).glob("umap=*.parquet"))
        self._view("umap", f"SELECT * FROM {scan(umaps)}" if umaps else None)
        queries = sorted((self.root / layout.INDEXES).glob("*/queries/*.parquet"))
        self._view("neighbors", f"SELECT * FROM {scan(queries)}"
                   if queries else None)

    def _families(self, tiling_ids: list[str], models: list[str]) -> dict[str, dict[str, tuple]]:
        """Compactable families and their current members {slide_id: (file, content token[, recorded size])}."""
        fams: dict[str, dict[str, tuple]] = {f"tiles={t}": {} for t in tiling_ids}
        c = self._status.columns
        dirs = {t: str(layout.tiling_dir(self.root, t)) for t in tiling_ids}
        for i in range(len(c["slide_id"])):
            fam = f"tiles={c['id'][i]}"
            if c["stage"][i] == "tiling" and c["state"][i] == "ok" and fam in fams:
                sid, tid = c["slide_id"][i], c["id"][i]
                tok = c["digest"][i] or f"size:{c['size'][i]}:{c['finished_at'][i]}"
                # a plain string (a Path per slide costs 30 us: 0.3 s per bind at 10,000 slides); same name as
                # layout.tiles_path, which checks the ids (slide ids in records were checked when written)
                fams[fam][sid] = (os.path.join(dirs[tid], layout.slide_file(sid, ".parquet")), tok, c["size"][i])
        for mid in models:
            if not (layout.model_dir(self.root, mid) / layout.MODEL_INDEX).exists():
                continue  # a model is visible only once complete
            members = {}
            with contextlib.suppress(OSError):
                for e in os.scandir(layout.predictions_dir(self.root, mid)):
                    if e.name.startswith("slide=") and e.name.endswith(".parquet"):
                        st = e.stat()
                        members[e.name[6:-8]] = (Path(e.path), f"{st.st_size}:{st.st_mtime_ns}")
            fams[f"predictions={mid}"] = members
        return fams

    def compact(self, families: list[str] | None = None) -> dict:
        """Compact the commit records and per-slide Parquet families (all, or `families`) now.

        A writer's step: `hefeat compact`, and the writers after they commit (`compact_after_write`).
        """
        t0 = time.perf_counter()
        self.require()
        with self._lock:
            self._status = records.compact_settled(self.root)
            fams = self._families(layout.known_ids(self.root, layout.TILES, "tiling"),
                                  layout.known_ids(self.root, layout.MODELS))
            if families is not None:
                fams = {f: m for f, m in fams.items() if f in set(families)}
            n = 0
            for fam, members in fams.items():
                if members:
                    n += len(compact.plan(self.root, fam, members).loose)
                    compact.compact(self.root, fam, members)
            self._token = None
        return {"records": len(self._status.columns["slide_id"]), "files": n, "families": sorted(fams),
                "malformed": self._status.malformed, "seconds": round(time.perf_counter() - t0, 3)}

    def compact_after_write(self, stage: str, key: str) -> None:
        """What a writer runs once its slides are committed: records and the family it wrote, compacted.

        Compaction only saves readers time (a plan reads loose files the same), so a store that cannot
        be written to, or a failure here, leaves the results as they are.
        """
        if not self.writable():
            return
        fam = {"tiling": f"tiles={key}", "predictions": f"predictions={key}"}.get(stage)
        import duckdb

        try:
            self.compact([fam] if fam else [])
        except (OSError, duckdb.Error) as e:
            import warnings

            warnings.warn(f"compaction after {stage} {key} did not run ({e}); `hefeat compact` retries it",
                          stacklevel=2)

    # -- queries --------------------------------------------------------------------------
    def sql(self, query: str, params: list | None = None, *, tiling: str | None = None) -> pd.DataFrame:
        """Run read-only SQL over the catalog and its views (the sandbox); returns a DataFrame.

        With `tiling`, the `tiles` view holds that tiling's tiles only, so a query written without a
        tiling filter cannot mix tilings. Anything but a read is refused with a one-line error.
        """
        return self._run(query, params, tiling, _frame)

    def sql_arrow(self, query: str, params: list | None = None, *, tiling: str | None = None):
        """Like `sql`, as a pyarrow Table (list columns stay columnar: no Python objects per value)."""
        return self._run(query, params, tiling, _arrow)

    def _run(self, query: str, params: list | None, tiling: str | None, fetch):
        import duckdb

        statements = check_read_only(query)
        with self.session():
            with self._lock:
                cur = self._db.cursor()
            try:
                return self._execute(cur, statements, params, tiling, fetch)
            except duckdb.Error as e:
                raise HefeatError(f"SQL failed: {str(e).splitlines()[0]}") from None
            finally:
                cur.close()

    def _execute(self, cur, statements: list, params: list | None, tiling: str | None, fetch):
        if tiling is not None:  # `tiles` of this cursor: that tiling only
            self.tiling(tiling)
            cur.execute(f"CREATE TEMP VIEW tiles AS {self._tiling_sql.get(tiling) or EMPTY_VIEWS['tiles']}")
        for st in statements[:-1]:
            cur.execute(st)
        return fetch(cur, statements[-1], params or [])

    def tile_query(self, query: str, tiling_id: str, params: list | None = None) -> pd.DataFrame:
        """Rows of `query` (with slide_id, tile_id) that are tiles of `tiling_id`, checked.

        The query sees only that tiling in `tiles`; a result naming another tiling, or repeating a
        (slide_id, tile_id) pair, is refused with a message instead of being matched silently.
        """
        df = self.sql(query, params, tiling=tiling_id)
        if not {"slide_id", "tile_id"} <= set(df.columns):
            raise HefeatError(f"The query must return slide_id and tile_id columns; it returned {list(df.columns)[:8]}")
        if df.empty and len(self.sql(query, params)):
            raise HefeatError(f"The query selects tiles of another tiling only (none of tiling {tiling_id}); use an "
                              f"extraction of that tiling, or filter on tiling_id = '{tiling_id}'")
        if "tiling_id" in df.columns:
            other = sorted(set(df["tiling_id"].dropna().astype(str)) - {tiling_id})
            if other:
                raise HefeatError(f"The query returns tiles of tiling {', '.join(other)}, but this extraction is on "
                                  f"tiling {tiling_id}; drop the tiling filter or use an extraction of that tiling")
        if df.duplicated(["slide_id", "tile_id"]).any():
            ex = df.loc[df.duplicated(["slide_id", "tile_id"]), ["slide_id", "tile_id"]].head(2).values.tolist()
            raise HefeatError(f"The query returns the same tile more than once (e.g. {ex}); "
                              "each (slide_id, tile_id) of tiling " + tiling_id + " may appear once")
        return df

    # -- paths (formatted in layout.py) ---------------------------------------------------
    def tiling_dir(self, tiling_id: str) -> Path:
        """Folder of one tiling's per-slide Parquet files."""
        return layout.tiling_dir(self.root, tiling_id)

    def tiles_path(self, tiling_id: str, slide_id: str) -> Path:
        """Tile metadata Parquet of one slide in one tiling."""
        return layout.tiles_path(self.root, tiling_id, slide_id)

    def extraction_dir(self, extraction_id: str) -> Path:
        """Folder of one extraction's per-slide HDF5 files."""
        return layout.extraction_dir(self.root, extraction_id)

    def features_path(self, extraction_id: str, slide_id: str) -> Path:
        """Feature HDF5 of one slide in one extraction."""
        return layout.features_path(self.root, extraction_id, slide_id)

    def aggregates_path(self, extraction_id: str) -> Path:
        """Consolidated slide table of one extraction: file identity, byte offsets and aggregates per slide."""
        return self.extraction_dir(extraction_id) / "_aggregates.h5"

    def status_dir(self, stage: str, run_key: str) -> Path:
        """Folder of per-slide commit records of one stage (tiling/extraction) and id."""
        return layout.status_dir(self.root, stage, run_key)

    def status_path(self, stage: str, run_key: str, slide_id: str) -> Path:
        """Commit record of one slide for one stage and id."""
        return layout.status_path(self.root, stage, run_key, slide_id)

    def model_dir(self, model_id: str) -> Path:
        """Folder of one fitted model."""
        return layout.model_dir(self.root, model_id)

    def predictions_path(self, model_id: str, slide_id: str) -> Path:
        """Per-slide predictions Parquet of one model."""
        return layout.predictions_path(self.root, model_id, slide_id)

    def index_dir(self, index_id: str) -> Path:
        """Folder of one neighbour index (faiss file, id map, provenance)."""
        return layout.index_dir(self.root, index_id)

    def umap_path(self, umap_id: str) -> Path:
        """Parquet of one UMAP's coordinates."""
        return layout.umap_path(self.root, umap_id)

    def qc_thumbnail_path(self, tiling_id: str, slide_id: str) -> Path:
        """QC picture (thumbnail, mask outline, tiles) of one slide in one tiling."""
        return layout.qc_thumbnail_path(self.root, tiling_id, slide_id)

    def reports_dir(self, name: str) -> Path:
        """Folder for PNG reports (created)."""
        d = layout.reports_dir(self.root, name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run_dir(self, run_id: str) -> Path:
        """Folder of one run's record."""
        return layout.run_dir(self.root, run_id)

    def job_dir(self, job_id: str) -> Path:
        """Folder of one fine-tuning job."""
        return layout.job_dir(self.root, job_id)

    # -- records --------------------------------------------------------------------------
    def read_status(self, stage: str, run_key: str, slide_id: str) -> dict | None:
        """Commit record of one slide, or None if it never ran (or its record is unreadable)."""
        try:
            return records.read_record(self.status_path(stage, run_key, slide_id))
        except records.MalformedRecord:
            return None

    def write_status(self, stage: str, run_key: str, slide_id: str, row: dict) -> None:
        """Write a slide's commit record atomically (all schema fields; see hefeat.store.commit)."""
        fields = {k: v for k, v in row.items() if k not in ("stage", "id", "slide_id", "state")}
        records.write_record(self.root, records.make_record(stage, run_key, slide_id, row["state"], **fields))

    def status_snapshot(self) -> records.StatusSnapshot:
        """The commit records as last bound (with malformed files and lock files seen)."""
        with self._lock:
            self._bind()
            return self._status

    def finished(self, stage: str, key: str) -> pd.DataFrame:
        """Committed slides of a stage and id: slide_id, n_tiles, digest, size, path (slide order)."""
        c = self.status_snapshot().columns
        rows = [(c["slide_id"][i], c["n_tiles"][i], c["digest"][i] or f"size:{c['size'][i]}", c["size"][i], c["path"][i])
                for i in range(len(c["slide_id"]))
                if c["stage"][i] == stage and c["id"][i] == key and c["state"][i] == "ok"]
        df = pd.DataFrame(rows, columns=["slide_id", "n_tiles", "digest", "size", "path"])
        return df.sort_values("slide_id").reset_index(drop=True)

    # -- registries -----------------------------------------------------------------------
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
        p = layout.tiling_meta_path(self.root, check_id(tiling_id, "tiling_id"))
        if not p.exists():
            known = [t for t in layout.known_ids(self.root, layout.TILES, "tiling")
                     if layout.tiling_meta_path(self.root, t).exists()]
            hint = (" (that is an extraction id; its tiling is "
                    f"{read_json(layout.extraction_meta_path(self.root, tiling_id)).get('tiling_id')})"
                    if tiling_id in layout.known_ids(self.root, layout.FEATURES, "extraction") else "")
            raise HefeatError(f"Tiling {tiling_id!r} does not exist in {self.root}{hint}. "
                              f"Known: {', '.join(known) or 'none (run hefeat tile)'}")
        return read_json(p)

    def extraction(self, extraction_id: str) -> dict:
        """Provenance of an extraction; clear error if unknown."""
        p = layout.extraction_meta_path(self.root, check_id(extraction_id, "extraction_id"))
        if not p.exists():
            known = layout.known_ids(self.root, layout.FEATURES, "extraction")
            hint = (" (that is a tiling id; hefeat sql \"SELECT extraction_id, encoder FROM extractions\" lists "
                    "the extractions and their tilings)"
                    if extraction_id in layout.known_ids(self.root, layout.TILES, "tiling") else "")
            raise HefeatError(f"Extraction {extraction_id!r} does not exist in {self.root}{hint}. "
                              f"Known: {', '.join(known) or 'none (run hefeat extract)'}")
        return read_json(p)

    def expression_info(self, dataset: str = "expression") -> dict:
        """The expression dataset's row (n_samples, n_genes, fingerprint, source, ...); clear error if unknown."""
        df = self.sql("SELECT * FROM expression_datasets WHERE dataset = ?", [dataset])
        if df.empty:
            known = self.sql("SELECT dataset FROM expression_datasets ORDER BY 1")["dataset"].tolist()
            raise HefeatError(f"No expression dataset {dataset!r} in the store. Known: {', '.join(known) or 'none'} "
                              "(ingest one: hefeat ingest expression FILE --dataset NAME)")
        return df.iloc[0].to_dict()

    def tiles(self, tiling_id: str, slide_id: str) -> pd.DataFrame:
        """Tile metadata of one committed slide in one tiling (key: tiling_id, slide_id, tile_id)."""
        self.tiling(tiling_id)
        rec = self.read_status("tiling", tiling_id, slide_id)
        p = self.tiles_path(tiling_id, slide_id)
        if not rec or rec["state"] != "ok" or not p.exists():
            raise HefeatError(f"Slide {slide_id} has no tiles in tiling {tiling_id} (not tiled, skipped or failed); "
                              f"see hefeat status, or run: hefeat tile")
        df = pd.read_parquet(p)
        if "tiling_id" in df.columns and not (df["tiling_id"] == tiling_id).all():
            raise HefeatError(f"{p} holds tiles of another tiling; the store is inconsistent (re-run hefeat tile)")
        return df


def open_store(root: str | os.PathLike | None = None) -> Store:
    """The store at `root`, $HEFEAT_STORE, or stores/default (must exist)."""
    return Store(root or os.environ.get("HEFEAT_STORE", DEFAULT_STORE)).require()
