"""Tiling throughput: tissue detection + grid + QC on the synthetic cohort (tiles/s, s/slide).

Run: python benchmarks/tiling.py [--slides 24]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import tempfile
import time
from pathlib import Path

from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.synth import make_cohort
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=24)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        make_cohort(Path(d) / "c", n_slides=a.slides, seed=0)
        synth_s = time.perf_counter() - t
        st = Store.init(Path(d) / "st")
        ingest_slides(st, sorted(glob.glob(f"{d}/c/slides/*.tiff")))
        s = run_tiling(st, TilingParams(mpp=0.5, size=224))
        s1 = run_tiling(st, TilingParams(mpp=0.5, size=224, tissue_threshold=0.4), threads=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"synthetic cohort: {a.slides} slides in {synth_s:.1f} s")
    print(f"tiling ({os.cpu_count()} threads): {s.tiles} tiles, {s.tiles_per_s:.0f} tiles/s, {s.seconds / a.slides:.3f} s/slide")
    print(f"tiling (1 thread):  {s1.tiles} tiles, {s1.tiles_per_s:.0f} tiles/s, {s1.seconds / a.slides:.3f} s/slide")
    print(f"thread speed-up: {s.tiles_per_s / max(s1.tiles_per_s, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
