"""Content-derived identifiers: the same inputs always give the same id."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def content_id(params: dict[str, Any], *, prefix: str = "", length: int = 12) -> str:
    """Hash of a JSON-serialisable parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:length]
    return f"{prefix}{digest}"


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Slide fingerprint: file size plus a hash of its first and last MiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return f"{size}-{h.hexdigest()[:16]}"


def check_id(value: str, what: str = "slide_id") -> str:
    """Validate an id used in file names (letters, digits, '.', '_', '-')."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        from hefeat.errors import HefeatError

        raise HefeatError(
            f"{what} {value!r} is not usable: expected letters, digits, '.', '_' or '-' "
            f"(at most 128 characters, not starting with punctuation). Rename it in the manifest."
        )
    return value


def sanitize_id(value: str) -> str:
    """Turn a file stem into a valid id by replacing other characters with '_'."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", value).lstrip("._-")
    return s[:128] or "slide"
