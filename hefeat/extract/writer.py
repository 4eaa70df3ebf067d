"""Writing one slide's features: the one place an extraction turns embedded rows into a committed HDF5 file.

`SlideFeatures` is a claimed slide being written; `FeatureSink.put` appends a block of rows (cast to
the stored dtype and checked finite as stored), and once every row is in, renames the file into
place and records the slide through the per-slide runner (`SlideRunner.ok`); `fail` drops the
temporary file and records the failure. The pipeline's background writer thread calls it for
every batch, and decode-once (hefeat.extract.decode_once) for the blocks it embedded while tiling,
so both write the same bytes and the same record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hefeat.errors import NonFiniteError
from hefeat.store import faults, ids
from hefeat.store.features import FeatureFileWriter, check_storable

if TYPE_CHECKING:
    from hefeat.runner import SlideRunner, SlideTask


@dataclass
class SlideFeatures:
    """One claimed slide whose features are being written: its tiles' coordinates and the open file."""

    task: SlideTask
    path: str
    mpp: float
    coords: np.ndarray  # (n, 2) level-0 x, y
    size0: float
    failed: str | None = None
    decode: str | None = None  # how its tiles were decoded where that differs from the run's (its status row)
    writer: FeatureFileWriter | None = None
    digest: object = field(default_factory=ids.new_hasher)

    @property
    def slide_id(self) -> str:
        return self.task.slide_id


class FeatureSink:
    """Appends blocks of a slide's rows to its file and commits the slide through the runner when it is complete."""

    def __init__(self, runner: SlideRunner, open_writer: Callable[[SlideFeatures], FeatureFileWriter], info: dict,
                 dtype: str):
        self.runner, self.open_writer, self.info, self.dtype = runner, open_writer, info, np.dtype(dtype)

    def put(self, job: SlideFeatures, start: int, rows: np.ndarray) -> None:
        """Write rows [start, start + len(rows)) of the slide; commit it once all its rows are written."""
        if job.failed:
            return
        try:
            if job.writer is None:
                job.writer = self.open_writer(job)
                job.digest.update(np.ascontiguousarray(job.coords, np.int64).tobytes())
            faults.point("features.write")
            with np.errstate(over="ignore"):
                block = rows.astype(self.dtype, copy=False)
            check_storable(rows, block, start)  # finite as stored: a float16 overflow fails the slide
            job.writer.write(start, block)
            job.digest.update(np.ascontiguousarray(block).tobytes())
            if job.writer.written < len(job.coords):
                return
            faults.point("features.rename")
            job.writer.commit()
            job.writer = None
            faults.point("features.renamed")
        except (OSError, NonFiniteError) as e:  # a full disk (or a failing one), or values the stored dtype
            self.fail(job, e)                    # cannot hold, fail the slide; the runner decides whether to stop
            return
        info = self.info if job.decode is None else {**self.info, "decode": job.decode}
        self.runner.ok(job.task, n_tiles=len(job.coords), digest=job.digest.hexdigest(), **info)

    def fail(self, job: SlideFeatures, err: str | BaseException) -> None:
        """Drop the slide's temporary file and record it failed (a string: a tile that could not be read)."""
        job.failed = str(err)
        self.abort(job)
        self.runner.fail(job.task, err, code="read_error" if isinstance(err, str) else None)

    @staticmethod
    def abort(job: SlideFeatures) -> None:
        """Drop a half-written file (a crash or Ctrl-C leaves none behind)."""
        if job.writer is not None:
            job.writer.abort()
            job.writer = None
