"""Demo stages beyond tiling (extraction, models, exploration), added as they land."""

from __future__ import annotations


def later_stages(store, out: dict, data, *, encoder=None, say=print) -> dict:
    """Run the demo's later stages; returns extra summary fields."""
    return {"lines": []}
