"""Fixed schemas: the catalog tables, the per-slide commit record and the empty shapes of views."""

from __future__ import annotations

#: Bump when the catalog tables change; `Store.init` migrates older catalogs.
FORMAT_VERSION = 2

#: Per spot slide: the technology and its spot diameter (the default spot patch), from a spatial reader.
SPOT_META_DDL = """CREATE TABLE IF NOT EXISTS spot_meta (
        slide_id VARCHAR PRIMARY KEY, technology VARCHAR, spot_diameter_um DOUBLE, source VARCHAR)"""

CATALOG_DDL = [
    """CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS slides (
        slide_id VARCHAR PRIMARY KEY, patient_id VARCHAR, site VARCHAR, path VARCHAR,
        fingerprint VARCHAR, vendor VARCHAR, width BIGINT, height BIGINT, level_count INTEGER,
        level_dimensions VARCHAR, mpp_x DOUBLE, mpp_y DOUBLE, mpp_source VARCHAR,
        objective_power DOUBLE, ingested_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS samples (
        dataset VARCHAR, sample_id VARCHAR, slide_id VARCHAR, patient_id VARCHAR)""",
    # Expression is stored wide: one row per (dataset, sample) with the values in gene order.
    """CREATE TABLE IF NOT EXISTS expression_datasets (
        dataset VARCHAR PRIMARY KEY, n_samples BIGINT, n_genes BIGINT, n_missing BIGINT,
        fingerprint VARCHAR, source VARCHAR, source_fingerprint VARCHAR, orientation VARCHAR,
        ingested_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS expression_genes (dataset VARCHAR, pos INTEGER, gene VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS expression_matrix (dataset VARCHAR, sample_id VARCHAR, "values" FLOAT[])""",
    """CREATE TABLE IF NOT EXISTS spots (
        slide_id VARCHAR, spot_id VARCHAR, x DOUBLE, y DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS spot_counts (
        slide_id VARCHAR, spot_id VARCHAR, gene VARCHAR, count DOUBLE)""",
    SPOT_META_DDL,
    """CREATE TABLE IF NOT EXISTS ingests (
        kind VARCHAR, source VARCHAR, fingerprint VARCHAR, n_rows BIGINT, ingested_at TIMESTAMP)""",
]

#: Catalog tables exposed under their own name in every query (plus `clinical` once ingested).
CATALOG_TABLES = ("slides", "samples", "expression_datasets", "expression_genes", "expression_matrix",
                  "spots", "spot_counts", "spot_meta", "ingests")

#: `samples` as every reader sees it: a stored row points at a slide (slide_id set) or at a patient
#: (slide_id NULL, patient_id set), resolved here against `slides`, so slides.patient_id is the one
#: patient identity (clinical or manifest re-ingest re-keys every sample at once). `{cat}` = catalog.
SAMPLES_VIEW = (
    "SELECT s.dataset, s.sample_id, sl.slide_id, sl.patient_id FROM {cat}.samples s "
    "JOIN {cat}.slides sl ON sl.slide_id = s.slide_id WHERE s.slide_id IS NOT NULL "
    "UNION ALL SELECT s.dataset, s.sample_id, sl.slide_id, sl.patient_id FROM {cat}.samples s "
    "JOIN {cat}.slides sl ON sl.patient_id = s.patient_id WHERE s.slide_id IS NULL"
)

#: The long view of expression for SQL users (one row per sample and gene).
EXPRESSION_VIEW = (
    "SELECT m.dataset, m.sample_id, g.gene, CAST(m.\"values\"[g.pos] AS DOUBLE) AS value "
    "FROM expression_matrix m JOIN expression_genes g ON m.dataset = g.dataset"
)

# -- the per-slide commit record (status/<stage>=<key>/<sid>.json) ----------------------------
#: Every record has every one of these fields (null when not applicable), in this order.
STATUS_FIELDS: dict[str, str] = {
    "stage": "VARCHAR",          # tiling | extraction
    "id": "VARCHAR",             # tiling id or extraction id
    "slide_id": "VARCHAR",
    "state": "VARCHAR",          # ok | skipped | failed
    "reason_code": "VARCHAR",    # see REASON_CODES; null when ok
    "reason": "VARCHAR",         # the message, for people
    "n_tiles": "BIGINT",
    "seconds": "DOUBLE",
    "tiles_per_s": "DOUBLE",
    "path": "VARCHAR",           # the committed output, relative to the store root
    "size": "BIGINT",            # its size in bytes when committed
    "digest": "VARCHAR",         # digest of its content (data fingerprints are built from these)
    "input_digest": "VARCHAR",   # what it was computed from (slide fingerprint + MPP, or the tiles' digest)
    "dim": "INTEGER",
    "precision": "VARCHAR",
    "device": "VARCHAR",
    "batch_size": "INTEGER",
    "host": "VARCHAR",
    "pid": "BIGINT",
    "finished_at": "TIMESTAMP",
    "info": "VARCHAR",           # JSON of anything stage-specific beyond these columns
}

STATES = ("ok", "skipped", "failed")

#: Machine-readable reasons next to the free text.
REASON_CODES = {
    "no_tissue": "the slide has no detectable tissue (skipped, not an error)",
    "no_spots": "a spot tiling was asked for a slide without spots",
    "slide_missing": "the slide file is gone",
    "slide_changed": "the slide file changed since ingest",
    "read_error": "the slide or a tile could not be read",
    "non_finite": "the encoder produced NaN or inf",
    "disk_full": "no space left on the store's disk",
    "error": "any other error (see reason)",
}

# Empty shapes for views, so queries work before any file exists.
EMPTY_VIEWS = {
    "tiles": "SELECT NULL::VARCHAR AS tiling_id, NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, NULL::BIGINT AS x, "
    "NULL::BIGINT AS y, NULL::DOUBLE AS size0, NULL::INTEGER AS \"row\", NULL::INTEGER AS col, NULL::FLOAT AS tissue_frac, "
    "NULL::FLOAT AS sharpness, NULL::FLOAT AS mean_r, NULL::FLOAT AS mean_g, NULL::FLOAT AS mean_b, "
    "NULL::FLOAT AS background_frac, NULL::FLOAT AS density WHERE false",
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
    "NULL::BIGINT AS n_vectors, NULL::DOUBLE AS recall_at_10, NULL::VARCHAR AS created WHERE false",
    "umap": "SELECT NULL::VARCHAR AS umap_id, NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, "
    "NULL::FLOAT AS umap_x, NULL::FLOAT AS umap_y WHERE false",
    "neighbors": "SELECT NULL::VARCHAR AS query_id, NULL::VARCHAR AS index_id, NULL::INTEGER AS rank, "
    "NULL::VARCHAR AS slide_id, NULL::BIGINT AS tile_id, NULL::FLOAT AS distance WHERE false",
    "clinical": "SELECT NULL::VARCHAR AS slide_id, NULL::VARCHAR AS patient_id WHERE false",
    "spot_meta": "SELECT NULL::VARCHAR AS slide_id, NULL::VARCHAR AS technology, NULL::DOUBLE AS spot_diameter_um, "
    "NULL::VARCHAR AS source WHERE false",
}
