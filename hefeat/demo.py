"""`hefeat demo`: the whole current pipeline on a synthetic cohort, end to end."""

from __future__ import annotations

import glob
import time
from collections.abc import Callable
from pathlib import Path

from hefeat.store.catalog import DEFAULT_STORE, Store

# 112 µm tiles (the papers' field of view) seen at 1 µm/px: a quarter of the pixels of 224 px at
# 0.5 µm/px, which keeps the whole demo within ~1.5 minutes on 2 CPU cores with bf16 (~3.5 at fp32).
# The encoder (a CNN) takes the 112 px tiles as they are (fit "native"), so the stated 1 µm/px is what it sees.
DEMO_TILES = {"mpp": 1.0, "size": 112}


def run_demo(
    *,
    data_dir: str = "data/demo",
    store: str | None = None,
    n_slides: int = 24,
    seed: int = 0,
    encoder: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Synthesise a cohort, build a store from it, tile it, and fit what the store supports."""
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.ingest import ingest_clinical, ingest_expression, ingest_spots

    say = echo or (lambda s: None)
    t0 = time.perf_counter()
    data = Path(data_dir)
    if not (data / "truth.json").exists():
        say(f"[1] synthesising {n_slides} slides into {data} ...")
        make_cohort(data, n_slides=n_slides, seed=seed)
    else:
        say(f"[1] using the synthetic cohort already in {data}")
    st = Store.init(store or DEFAULT_STORE)
    say(f"[2] ingesting into {st.root}")
    ingest_slides(st, sorted(glob.glob(str(data / "slides" / "*.tiff"))))
    ingest_clinical(st, data / "clinical.csv")
    ingest_expression(st, data / "expression.parquet")
    ingest_spots(st, data / "spots.parquet")
    say(f"[3] tiling ({DEMO_TILES['size']} px at {DEMO_TILES['mpp']:g} µm/px) and spot patches")
    tiles = run_tiling(st, TilingParams(**DEMO_TILES))
    spots = run_tiling(st, TilingParams(**DEMO_TILES, spots=True))
    out = {"store": str(st.root), "data": str(data), "tiling_id": tiles.extra["tiling_id"],
           "spot_tiling_id": spots.extra["tiling_id"], "tiles": int(st.sql("SELECT count(*) FROM tiles").iloc[0, 0])}
    from hefeat.demo_stages import later_stages

    out.update(later_stages(st, out, data, encoder=encoder, say=say))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["text"] = "\n".join([f"Demo done in {out['seconds']} s: store {out['store']}, {out['tiles']} tiles "
                             f"(tiling {out['tiling_id']}, spot tiling {out['spot_tiling_id']})."] + out.pop("lines", []))
    return out
