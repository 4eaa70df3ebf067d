"""Run extraction on Ray: the same per-slide work, one shard per Ray task, over every GPU/node Ray sees."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import TYPE_CHECKING

from hefeat.errors import HefeatError
from hefeat.runner import RunSummary
from hefeat.store.catalog import Store

if TYPE_CHECKING:  # pragma: no cover
    from hefeat.slides.tiling import TilingParams


def run_extraction_ray(store: Store, *, shards: int | None = None, address: str | None = None,
                       tile_params: TilingParams | None = None, **kwargs) -> RunSummary:
    """Split the slides into shards and run `run_extraction` for each on Ray Data (local Ray if no address).

    With `tile_params` the slides are tiled here first (every shard embeds from a finished tiling, so
    decode once is not used; the summary's `decode_once` says so and carries the tiling's summary).
    """
    try:
        import ray
    except ImportError:
        raise HefeatError("--engine ray needs Ray: pip install 'hefeat[ray]'") from None
    if kwargs.pop("shard", None):
        raise HefeatError("--shard and --engine ray do not combine: Ray does the sharding")
    once = None
    if tile_params is not None:
        from hefeat.slides.run import run_tiling

        opt = kwargs.get("options")
        t = run_tiling(store, tile_params, slides=kwargs.get("slides"), fail_fast=bool(opt and opt.fail_fast),
                       progress=bool(opt and opt.progress))
        kwargs["tiling_id"] = t.extra["tiling_id"]
        once = {"used": False, "why": "--engine ray: slides are tiled first, then embedded from a second read",
                "tiling": t.to_dict()}
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    n = shards or max(gpus, 1 if gpus else max(1, cpus // 2))
    root = str(store.root)

    def work(row: dict) -> dict:
        from hefeat.extract.pipeline import run_extraction

        s = run_extraction(Store(root), shard=row["shard"], **kwargs)
        return {"summary": json.dumps(dataclasses.asdict(s), default=str)}

    import logging

    import ray.data

    # Ray Data says at INFO that it logs progress (stdout is not a terminal); our own summary follows instead.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.WARNING)
    items = [{"shard": f"{i + 1}/{n}"} for i in range(n)]
    # At most n tasks at once: `compute=TaskPoolStrategy(size=n)` where Ray has it (`concurrency=` is
    # deprecated since Ray 2.51 and prints a notice on every run), `concurrency=n` on older Ray.
    try:
        limit = {"compute": ray.data.TaskPoolStrategy(size=n)}
    except (AttributeError, TypeError):
        limit = {"concurrency": n}
    with warnings.catch_warnings():  # Ray Data's own DataContext fields warn about themselves (use_polars, ...)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
        out = ray.data.from_items(items, override_num_blocks=n).map(
            work, num_gpus=1 if gpus else 0, num_cpus=1, **limit).take_all()
    merged = RunSummary("extraction", "")
    for r in out:
        d = json.loads(r["summary"])
        merged.merge(d)
        merged.extra.setdefault("shards", []).append({"ok": len(d["ok"]), "tiles": d["tiles"], "seconds": d["seconds"]})
        merged.extra.update({k: v for k, v in d["extra"].items() if k in ("extraction_id", "tiling_id", "dim", "encoder")})
    merged.extra.update({"engine": "ray", "n_shards": n, "gpus": gpus})
    if once:
        merged.extra["decode_once"] = once
    return merged
