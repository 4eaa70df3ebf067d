"""Named fault-injection points on the commit path, so crash safety is proven at every step.

Each step of a commit calls `point("<kind>.<step>")`, e.g. `tiles.rename` just before a slide's
tiles Parquet is renamed into place or `record.renamed` just after its commit record is. A test
arms a point through the environment of the process it starts, or in-process with `arm()`:

    HEFEAT_FAULT="tiles.renamed:kill@2"   SIGKILL this process the 2nd time the point is reached
    HEFEAT_FAULT="record.write:enospc"    raise OSError(ENOSPC) there, as a full disk would
    HEFEAT_FAULT="features.write:raise"   raise RuntimeError there

Unarmed, a point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

_armed: dict[str, list] = {}
_lock = threading.Lock()


def _parse(spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        action, _, nth = (rest or "raise").partition("@")
        arm(name, action, int(nth or 1))


def arm(name: str, action: str = "raise", nth: int = 1) -> None:
    """Make the `nth` arrival at point `name` kill the process, raise ENOSPC, or raise RuntimeError."""
    if action not in ("kill", "enospc", "raise"):
        raise ValueError(f"fault action must be kill, enospc or raise, got {action!r}")
    with _lock:
        _armed[name] = [action, nth]


def disarm() -> None:
    """Remove every armed fault."""
    with _lock:
        _armed.clear()


def point(name: str) -> None:
    """A named step of a commit; fires the fault armed for it, if any."""
    if not _armed:
        return
    with _lock:
        hit = _armed.get(name)
        if hit is None:
            return
        hit[1] -= 1
        if hit[1] > 0:
            return
        del _armed[name]
    action = hit[0]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
    raise RuntimeError(f"fault injected at {name}")


_parse(os.environ.get("HEFEAT_FAULT", ""))
