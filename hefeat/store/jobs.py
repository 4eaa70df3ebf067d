"""Fine-tuning job records as store records: jobs/<job_id>/{job.json, index.json}.

save / load / exists of a job's record, and whether it is finished. job.json holds the whole record
(recipe, data fingerprints, folds, status, and once finished the summary and the encoder); index.json,
written after it, the flat fields the catalog's `jobs` view lists. Each is written atomically. A
finished job's model (models/<job_id>/, hefeat.store.models) is committed before its records say
finished, so a job whose records are not finished while its model exists was interrupted in between
(hefeat.finetune.job completes them). The job folder's other files (folds, checkpoints, encoder,
heartbeat, claims) are named in hefeat.store.layout and written by hefeat.finetune. There is no
discard: a job's folder holds the checkpoints a re-run resumes from, and a forced re-run rewrites
its records in place. Ids come from hefeat.store.ids.finetune_job_id.
"""

from __future__ import annotations

from hefeat.store import layout
from hefeat.store.atomic import read_json, write_json
from hefeat.store.catalog import Store

INDEX_FIELDS = ("job_id", "task", "status", "precision", "split", "device", "processes", "created", "updated")


def job_exists(store: Store, jid: str) -> bool:
    """Whether a job with this id has a record (started, finished or interrupted)."""
    return layout.job_meta_path(store.root, jid).exists()


def known_jobs(store: Store) -> list[str]:
    """Ids of the jobs with a record."""
    return [j for j in layout.known_ids(store.root, layout.JOBS) if job_exists(store, j)]


def load_job(store: Store, jid: str) -> dict:
    """A job's record (job.json); the caller checks job_exists first (its message names what to run)."""
    return read_json(layout.job_meta_path(store.root, jid))


def save_job(store: Store, jid: str, job: dict, *, fault_kind: str | None = None) -> None:
    """Write a job's record, then its index record (`fault_kind` names their steps for hefeat.store.faults:
    '<kind>.meta' and '<kind>.index'; by default plain 'json')."""
    write_json(layout.job_meta_path(store.root, jid), job, kind=f"{fault_kind}.meta" if fault_kind else "json")
    write_json(layout.job_index_path(store.root, jid), job_index(job),
               kind=f"{fault_kind}.index" if fault_kind else "json")


def job_index(job: dict) -> dict:
    """The flat fields of a job's record that its index record holds."""
    return {k: job.get(k) for k in INDEX_FIELDS} | {"backbone": job["recipe"]["backbone"]}


def job_finished(store: Store, jid: str) -> bool:
    """Whether the job's record and its index record both say finished (a missing one counts as finished: a
    model copied without its job folder)."""
    return all(not p.exists() or read_json(p).get("status") == "finished"
               for p in (layout.job_meta_path(store.root, jid), layout.job_index_path(store.root, jid)))
