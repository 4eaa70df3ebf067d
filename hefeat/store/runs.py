"""Per-run records in runs/<run_id>/run.json: what ran, with what, how long, tiles/s."""

from __future__ import annotations

import os
import socket
import time

from hefeat.store.atomic import write_json
from hefeat.store.catalog import Store
from hefeat.store.ids import run_id as new_run_id


def timestamp() -> str:
    """Local time as recorded in status rows, provenance and run records (ISO, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def record_run(store: Store, command: str, summary: dict, *, params: dict | None = None) -> str:
    """Write a run record; returns its run_id."""
    run_id = new_run_id()
    write_json(store.run_dir(run_id) / "run.json", {
        "run_id": run_id, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
        "finished_at": timestamp(), "seconds": summary.get("seconds"),
        "tiles": summary.get("tiles"), "tiles_per_s": summary.get("tiles_per_s"),
        "summary": summary, "params": params or {},
    })
    return run_id
