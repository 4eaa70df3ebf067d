"""Fault injection for crash tests: HEFEAT_FAULT=<point>[@<step>] SIGKILLs the process at that point.

Points: 'step' (after optimiser step N, before any checkpoint of it), 'ckpt-tmp' (checkpoint written
to its temporary name, not yet renamed), 'ckpt-renamed' (renamed, nothing after it run),
'epoch-end' (epoch evaluated, its checkpoint not written), 'fold-done' (fold predictions written, the
fold not yet marked done), 'job-commit' (every fold done, the job's results not yet committed).
"""

from __future__ import annotations

import os
import signal

ENV = "HEFEAT_FAULT"


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if HEFEAT_FAULT names this point (and step, when it gives one)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, at = spec.partition("@")
    if point != name:
        return
    if at and (step is None or int(at) != step):
        return
    os.kill(os.getpid(), signal.SIGKILL)
