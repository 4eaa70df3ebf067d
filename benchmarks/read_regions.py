"""Reading 224 px tiles: hefeat's direct JPEG-tile read against OpenSlide's read_region (one run).

For each slide (a synthetic 12k × 10k px JPEG TIFF fabricated by hefeat.slides.synth, and OpenSlide's
CMU-1-Small-Region.svs: real Aperio, RGB JPEG with JPEGTables; and the synthetic slide at twice its
µm/px, read from pyramid level 1), reads the same tiles (a row-major grid,
as a tiling visits them) through `Slide.read` with HEFEAT_DIRECT_JPEG=0 (OpenSlide's read_region,
RGBA -> RGB) and =1 (hefeat.slides.direct_read), alternated, and prints CPU seconds per 1,000 tiles,
the ratio, and whether every byte was equal.
Run: python benchmarks/read_regions.py [--workdir /tmp/rr] [--tiles 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "CMU-1-Small-Region.svs"


def read_all(path: Path, xy: list[tuple[int, int]], direct: bool, zoom: int = 1) -> tuple[float, list[np.ndarray], bool]:
    """CPU s for reading every tile (at `zoom` times the slide's µm/px: pyramid level 1 at 2) through a freshly opened
    Slide, the tiles, and whether the direct path ran."""
    from hefeat.slides.direct_read import DirectRegions
    from hefeat.slides.reader import Slide

    os.environ["HEFEAT_DIRECT_JPEG"] = "1" if direct else "0"
    with Slide(path) as s:
        c = time.process_time()
        out = [s.read(x, y, 224, s.mpp.x * zoom) for x, y in xy]
        cpu = time.process_time() - c
        used = isinstance(s._direct, DirectRegions) and all(s._direct_same.values())
    return cpu, out, used


def bench(name: str, path: Path, tiles: int, repeat: int, zoom: int = 1) -> dict:
    """Alternated OpenSlide / direct passes over the same tiles."""
    from hefeat.slides.reader import Slide

    with Slide(path) as s:
        w, h = s.dimensions
    n = 224 * zoom
    xy = [(x, y) for y in range(0, h - n + 1, n) for x in range(0, w - n + 1, n)][:tiles]
    osl, dr, equal, used = [], [], True, True
    for _ in range(repeat):
        c0, a, _ = read_all(path, xy, False, zoom)
        c1, b, u = read_all(path, xy, True, zoom)
        osl.append(c0 / len(xy) * 1000)
        dr.append(c1 / len(xy) * 1000)
        equal &= all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
        used &= u
    return {"slide": name, "tiles": len(xy), "openslide_cpu_s_per_1000": [round(v, 3) for v in osl],
            "direct_cpu_s_per_1000": [round(v, 3) for v in dr], "direct_used": used, "bytes_equal": equal,
            "openslide_over_direct": round(float(np.mean(osl) / np.mean(dr)), 2), "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None, help="keep (and reuse) the fabricated slide here")
    ap.add_argument("--tiles", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from hefeat.slides.synth import make_cohort

    work = Path(a.workdir or tempfile.mkdtemp(prefix="hefeat-rr-"))
    cohort = work / "large-cohort"
    if not (cohort / "truth.json").exists():
        make_cohort(cohort, n_slides=1, n_genes=20, seed=3, width_um=6000, height_um=5000)
    res = [bench("synthetic 12k x 10k JPEG TIFF", cohort / "slides" / "S01.tiff", a.tiles, a.repeat),
           bench("same slide at 2x its um/px (pyramid level 1)", cohort / "slides" / "S01.tiff", a.tiles, a.repeat, 2),
           bench("CMU-1-Small-Region.svs (Aperio)", CMU, a.tiles, a.repeat)]
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
                      or platform.machine(), "results": res}, indent=1))


if __name__ == "__main__":
    main()
