"""Every file name and folder of a store, in one place.

A store is a directory; these functions turn ids into paths (and back). Nothing else in hefeat
formats a store path: Store methods, the catalog views and the workers all call these. A helper
with a new kind of output adds its path function here.

    catalog.duckdb                                 what users ingest (slides, expression, clinical, spots)
    tiles/tiling=<tid>/_tiling.json                a tiling's parameters
    tiles/tiling=<tid>/slide=<sid>.parquet         one slide's tiles
    features/extraction=<eid>/_extraction.json     an extraction's provenance
    features/extraction=<eid>/_precision.json      the recorded --precision auto decision (written once)
    features/extraction=<eid>/<sid>.h5             one slide's embeddings (CLAM/TRIDENT layout)
    status/<stage>=<key>/<sid>.json                one slide's commit record (ok / skipped / failed)
    status/<stage>=<key>/<sid>.lock                a worker's claim on one slide
    compact/<family>/...                           compacted copies of the per-slide files (catalog speed)
    models/<mid>/{model.json,arrays.npz,net.pt,<table>.parquet,index.json}
                                                   a fitted model (index.json written last)
    predictions/model=<mid>/slide=<sid>.parquet    a model's per-slide predictions; model=<mid> is a link
                                                   to its current generation (hefeat.store.predictions)
    predictions/.generations/<mid>/<gen>/          the generations (one current, others being written)
    predictions/model=<mid>/table=<name>.parquet   a model-level table written with its predictions (slide
                                                   values); models/<mid>/<name>.parquet links to it
    indexes/<iid>/{index.json,index.faiss,offsets.parquet}  a neighbour index; queries/<qid>.parquet saved queries
    umaps/umap=<uid>.parquet                       a UMAP's coordinates
    runs/<run_id>/run.json                         what ran, with what, how long
    jobs/<job_id>/{job.json,index.json}            a fine-tuning job (index.json written last)
    jobs/<job_id>/heartbeat.json                   a running job's heartbeat (its state: running / stopped)
    jobs/<job_id>/baseline_features.npy            frozen features of the job's initial backbone (baseline: init)
    jobs/<job_id>/commit.lock                      the claim of the process committing the job's results
    jobs/<job_id>/fold=<name>/{last.pt,best.pt,final.pt,metrics.json,metrics.csv,predictions.npz,done.json}
    jobs/<job_id>/fold=<name>/claim.lock           the claim of the process (group) training the fold
    jobs/<job_id>/encoder/{backbone-<fold>.safetensors,encoder.json}   the job's backbone as an encoder
    models/<mid>/report/<figure>.png               a model's report figures (hefeat report; FIG_* names)
    reports/<name>/                                PNG figures (the demo's: reports/demo/<figure>.png)
    reports/qc-<tid>/<sid>.png                     a slide's QC picture in one tiling
"""

from __future__ import annotations

import re
from pathlib import Path

from hefeat.store.ids import check_id

CATALOG = "catalog.duckdb"
TILES = "tiles"
FEATURES = "features"
STATUS = "status"
COMPACT = "compact"
COMPACT_LOCK = ".compact.lock"  # per family: serialises its compactions
MODELS = "models"
PREDICTIONS = "predictions"
INDEXES = "indexes"
UMAPS = "umaps"
RUNS = "runs"
JOBS = "jobs"
REPORTS = "reports"

#: Folders created by `hefeat init`.
FOLDERS = (TILES, FEATURES, STATUS, COMPACT, MODELS, PREDICTIONS, INDEXES, UMAPS, RUNS, REPORTS)

#: Report figures (PNG), by file name: in a model's report folder (model_report_dir, or the user's --out) and in
#: reports/<name>/ (the demo's figures).
MODEL_REPORT = "report"
FIG_R_DISTRIBUTION = "r_distribution.png"
FIG_TOP_GENES = "top_genes.png"
FIG_PROLIFERATION = "proliferation.png"
FIG_LEARNING_CURVES = "learning_curves.png"
FIG_ROC = "roc.png"
FIG_TRANSFER = "transfer.png"
FIG_SPOT_MAP = "spot_map.png"
FIG_HTI_SURVIVAL = "hti_survival.png"
FIG_FROZEN_VS_FINETUNED = "frozen_vs_finetuned.png"
FIG_UMAP = "umap.png"

TILING_META = "_tiling.json"
EXTRACTION_META = "_extraction.json"
PRECISION_DECISION = "_precision.json"
MODEL_INDEX = "index.json"
MODEL_META = "model.json"
MODEL_ARRAYS = "arrays.npz"
MODEL_NET = "net.pt"
TABLE_SUFFIX = ".parquet"
INDEX_OFFSETS = "offsets.parquet"
INDEX_META = "index.json"
INDEX_FILE = "index.faiss"
RUN_RECORD = "run.json"
JOB_INDEX = "index.json"
JOB_HEARTBEAT = "heartbeat.json"
JOB_META = "job.json"
JOB_BASELINE_FEATURES = "baseline_features.npy"
FOLD_LAST = "last.pt"
FOLD_BEST = "best.pt"
FOLD_FINAL = "final.pt"
FOLD_METRICS = "metrics.json"
FOLD_METRICS_CSV = "metrics.csv"
FOLD_PREDICTIONS = "predictions.npz"
FOLD_DONE = "done.json"
FOLD_STAGE = "finetune"  # the per-slide runner's stage of fine-tuning folds: status/finetune=<job_id>/<fold>.json
FOLD_CLAIM = "claim.lock"
JOB_COMMIT_CLAIM = "commit.lock"
JOB_ENCODER = "encoder"
ENCODER_META = "encoder.json"
STATUS_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"

#: Stages whose per-slide outputs go through the commit protocol, and the folder prefix of each.
STAGES = ("tiling", "extraction")

#: Inside predictions/: one folder per model holding its predictions generations.
GENERATIONS = ".generations"


def catalog_path(root: Path) -> Path:
    """The DuckDB catalog file."""
    return root / CATALOG


# -- tiles -----------------------------------------------------------------------------------
def tiling_dir(root: Path, tiling_id: str) -> Path:
    """Folder of one tiling's per-slide Parquet files."""
    return root / TILES / f"tiling={check_id(tiling_id, 'tiling_id')}"


def tiling_meta_path(root: Path, tiling_id: str) -> Path:
    """A tiling's parameters (JSON)."""
    return tiling_dir(root, tiling_id) / TILING_META


def slide_file(slide_id: str, ext: str) -> str:
    """File name of one slide's part of a per-slide family (tiles, predictions)."""
    return f"slide={slide_id}{ext}"


def tiles_path(root: Path, tiling_id: str, slide_id: str) -> Path:
    """Tile metadata Parquet of one slide in one tiling."""
    return tiling_dir(root, tiling_id) / slide_file(check_id(slide_id), ".parquet")


# -- features --------------------------------------------------------------------------------
def extraction_dir(root: Path, extraction_id: str) -> Path:
    """Folder of one extraction's per-slide HDF5 files."""
    return root / FEATURES / f"extraction={check_id(extraction_id, 'extraction_id')}"


def extraction_meta_path(root: Path, extraction_id: str) -> Path:
    """An extraction's provenance (JSON)."""
    return extraction_dir(root, extraction_id) / EXTRACTION_META


def precision_decision_path(root: Path, extraction_id: str) -> Path:
    """The precision an `auto` extraction runs at, decided once by its first worker (JSON, never rewritten)."""
    return extraction_dir(root, extraction_id) / PRECISION_DECISION


def features_path(root: Path, extraction_id: str, slide_id: str) -> Path:
    """Feature HDF5 of one slide in one extraction."""
    return extraction_dir(root, extraction_id) / output_name("extraction", check_id(slide_id))


# -- per-slide commit records and claims -----------------------------------------------------
def status_root(root: Path) -> Path:
    """Folder holding one sub-folder per (stage, key)."""
    return root / STATUS


def status_dir(root: Path, stage: str, key: str) -> Path:
    """Folder of the per-slide records of one stage (tiling/extraction) and id."""
    return root / STATUS / f"{check_id(stage, 'stage')}={check_id(key, 'id')}"


def status_path(root: Path, stage: str, key: str, slide_id: str) -> Path:
    """Commit record (JSON) of one slide for one stage and id."""
    return status_dir(root, stage, key) / f"{check_id(slide_id)}{STATUS_SUFFIX}"


def lock_path(root: Path, stage: str, key: str, slide_id: str) -> Path:
    """A worker's claim on one slide for one stage and id (a fine-tuning fold's: in the fold's folder)."""
    if stage == FOLD_STAGE:
        return fold_claim_path(job_dir(root, key), check_id(slide_id))
    return status_dir(root, stage, key) / f"{check_id(slide_id)}{LOCK_SUFFIX}"


def output_path(root: Path, stage: str, key: str, slide_id: str) -> Path:
    """The per-slide output a stage commits (the tiles Parquet or the features HDF5)."""
    return output_dir(root, stage, key) / output_name(stage, check_id(slide_id))


def output_dir(root: Path, stage: str, key: str) -> Path:
    """Folder of a stage's per-slide outputs."""
    if stage == "tiling":
        return tiling_dir(root, key)
    if stage == "extraction":
        return extraction_dir(root, key)
    if stage == FOLD_STAGE:
        return job_dir(root, key)
    raise ValueError(f"stage {stage!r} has no per-slide output")


def output_name(stage: str, slide_id: str) -> str:
    """File name of one slide's output of a stage (slide id not re-checked: callers pass checked ids)."""
    if stage == "tiling":
        return slide_file(slide_id, ".parquet")
    if stage == "extraction":
        return f"{slide_id}.h5"
    if stage == FOLD_STAGE:  # a fold's done record is its output; its commit record is in status/ like a slide's
        return f"fold={slide_id}/{FOLD_DONE}"
    raise ValueError(f"stage {stage!r} has no per-slide output")


def parse_status_dir(name: str) -> tuple[str, str] | None:
    """(stage, key) of a status folder name like 'tiling=t123', or None."""
    stage, sep, key = name.partition("=")
    return (stage, key) if sep and stage and key else None


# -- compaction ------------------------------------------------------------------------------
def compact_dir(root: Path, family: str) -> Path:
    """Folder of one compacted family (status, or tiles of one tiling)."""
    return root / COMPACT / family


def compact_manifest(root: Path, family: str) -> Path:
    """The manifest naming a compacted family's current parts."""
    return compact_dir(root, family) / "manifest.json"


# -- models, predictions, indexes, UMAPs, runs, jobs, reports ---------------------------------
def model_dir(root: Path, model_id: str) -> Path:
    """Folder of one fitted model."""
    return root / MODELS / check_id(model_id, "model_id")


def model_index_path(root: Path, model_id: str) -> Path:
    """A model's index record (written last: the model exists once it is there)."""
    return model_dir(root, model_id) / MODEL_INDEX


def model_file(root: Path, model_id: str, name: str) -> Path:
    """One of a model's files (MODEL_META, MODEL_ARRAYS, MODEL_NET)."""
    return model_dir(root, model_id) / name


def model_table_path(root: Path, model_id: str, table: str) -> Path:
    """A model's named table (metrics, slide_predictions, ...) as Parquet."""
    return model_dir(root, model_id) / f"{check_id(table, 'table')}{TABLE_SUFFIX}"


def predictions_dir(root: Path, model_id: str) -> Path:
    """Folder of one model's per-slide predictions."""
    return root / PREDICTIONS / f"model={check_id(model_id, 'model_id')}"


def predictions_path(root: Path, model_id: str, slide_id: str) -> Path:
    """Per-slide predictions Parquet of one model."""
    return predictions_file_in(predictions_dir(root, model_id), slide_id)


def predictions_file_in(folder: Path, slide_id: str) -> Path:
    """One slide's predictions file inside a predictions folder (or a generation of one)."""
    return folder / slide_file(check_id(slide_id), ".parquet")


def is_predictions_file(name: str) -> bool:
    """Whether a file name is one slide's predictions."""
    return name.startswith("slide=") and name.endswith(".parquet")


def predictions_table_in(folder: Path, table: str) -> Path:
    """A model-level table (e.g. slide_predictions) written in a predictions generation, committed with it."""
    return folder / f"table={check_id(table, 'table')}{TABLE_SUFFIX}"


def is_predictions_table(name: str) -> bool:
    """Whether a file name in a predictions generation is a model-level table."""
    return name.startswith("table=") and name.endswith(TABLE_SUFFIX)


def predictions_generations(root: Path, model_id: str) -> Path:
    """Folder of a model's predictions generations (the link predictions_dir points into it)."""
    return root / PREDICTIONS / GENERATIONS / check_id(model_id, "model_id")


def index_dir(root: Path, index_id: str) -> Path:
    """Folder of one neighbour index (faiss file, id map, provenance)."""
    return root / INDEXES / check_id(index_id, "index_id")


def index_query_path(root: Path, index_id: str, query_id: str) -> Path:
    """A saved neighbour query of one index."""
    return index_dir(root, index_id) / "queries" / f"{check_id(query_id, 'query_id')}.parquet"


def index_meta_path(root: Path, index_id: str) -> Path:
    """A neighbour index's provenance (written last)."""
    return index_dir(root, index_id) / INDEX_META


def index_file_path(root: Path, index_id: str) -> Path:
    """A neighbour index's faiss file."""
    return index_dir(root, index_id) / INDEX_FILE


def index_offsets_path(index_file: Path) -> Path:
    """The row-offsets table next to an index file."""
    return Path(index_file).with_name(INDEX_OFFSETS)


def umap_path(root: Path, umap_id: str) -> Path:
    """Parquet of one UMAP's coordinates."""
    return root / UMAPS / f"umap={check_id(umap_id, 'umap_id')}.parquet"


def run_dir(root: Path, run_id: str) -> Path:
    """Folder of one run's record."""
    return root / RUNS / check_id(run_id, "run_id")


def job_dir(root: Path, job_id: str) -> Path:
    """Folder of one fine-tuning job (checkpoints, log, provenance)."""
    return root / JOBS / check_id(job_id, "job_id")


def job_heartbeat_path(root: Path, job_id: str) -> Path:
    """A fine-tuning job's heartbeat (host, pid, time of the last beat)."""
    return job_dir(root, job_id) / JOB_HEARTBEAT


def job_baseline_features_path(root: Path, job_id: str) -> Path:
    """Frozen features of every sample from a job's initial backbone (NumPy .npy, the job's baseline: init)."""
    return job_dir(root, job_id) / JOB_BASELINE_FEATURES


def job_meta_path(root: Path, job_id: str) -> Path:
    """A job's full record (recipe, fingerprints, folds, status)."""
    return job_dir(root, job_id) / JOB_META


def job_index_path(root: Path, job_id: str) -> Path:
    """A job's index record (the listing's row)."""
    return job_dir(root, job_id) / JOB_INDEX


def fold_dir(root: Path, job_id: str, fold: str) -> Path:
    """Folder of one fold of a job (checkpoints, metrics, held-out predictions, done record)."""
    return fold_dir_in(job_dir(root, job_id), fold)


def fold_dir_in(job_folder: Path, fold: str) -> Path:
    """The folder of `fold` inside a job folder."""
    return Path(job_folder) / f"fold={fold}"  # fold names come from the split (not user text)


def fold_claim_path(job_folder: Path, fold: str) -> Path:
    """The claim (hefeat.store.locks) of the process group training `fold` of a job."""
    return fold_dir_in(job_folder, fold) / FOLD_CLAIM


def job_commit_claim_path(root: Path, job_id: str) -> Path:
    """The claim of the process committing a job's results (so two processes of one job never commit at once)."""
    return job_dir(root, job_id) / JOB_COMMIT_CLAIM


def job_encoder_dir(root: Path, job_id: str) -> Path:
    """Folder of a job's backbone registered as an encoder."""
    return job_dir(root, job_id) / JOB_ENCODER


def job_backbone_path(root: Path, job_id: str, fold: str) -> Path:
    """One fold's backbone weights (safetensors) of a job, exported for use as an encoder."""
    return job_encoder_dir(root, job_id) / f"backbone-{fold}.safetensors"


def reports_dir(root: Path, name: str) -> Path:
    """Folder for PNG reports (e.g. the demo's figures)."""
    return root / REPORTS / check_id(name, "report")


def qc_thumbnail_path(root: Path, tiling_id: str, slide_id: str) -> Path:
    """QC picture (thumbnail, mask outline, tiles) of one slide in one tiling."""
    return root / REPORTS / f"qc-{check_id(tiling_id, 'tiling_id')}" / f"{check_id(slide_id)}.png"


def model_report_dir(root: Path, model_id: str) -> Path:
    """Default folder of a model's report figures (hefeat report; --out puts them elsewhere)."""
    return model_dir(root, model_id) / MODEL_REPORT


def cartography_figure(slide_id: str) -> str:
    """File name of a trait model's cartography of one slide (in a report folder)."""
    return f"cartography_{check_id(slide_id)}.png"


# -- listing ---------------------------------------------------------------------------------
_KEYED = re.compile(r"^(?P<prefix>[a-z]+)=(?P<key>[A-Za-z0-9][A-Za-z0-9._-]*)$")


def predicted_slides(root: Path, model_id: str) -> list[str]:
    """Slides with a predictions file of a model, sorted."""
    d = predictions_dir(root, model_id)
    return sorted(p.name[len("slide="):-len(".parquet")] for p in d.glob("slide=*.parquet")) if d.is_dir() else []


def known_umaps(root: Path) -> list[str]:
    """Ids of the stored UMAPs, sorted."""
    base = root / UMAPS
    return sorted(p.name[len("umap="):-len(".parquet")] for p in base.glob("umap=*.parquet")) if base.is_dir() else []


def known_ids(root: Path, folder: str, prefix: str | None = None) -> list[str]:
    """Ids of the sub-folders of `folder` (e.g. tilings under tiles/ with prefix 'tiling'), sorted."""
    base = root / folder
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        if not p.is_dir():
            continue
        if prefix is None:
            out.append(p.name)
        elif (m := _KEYED.match(p.name)) and m["prefix"] == prefix:
            out.append(m["key"])
    return sorted(out)
