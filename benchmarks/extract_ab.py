"""A/B of the whole `hefeat extract` process, two checkouts alternated, against one bare encoder pass before and after.

Uses each checkout's own benchmarks/extract_slides.py (its `whole_process` runs that checkout's code) on a work dir
that extract_slides.py --workdir has fabricated; the calibration comes from that dir's cache.
Run: python benchmarks/extract_ab.py OLD_ROOT NEW_ROOT WORKDIR small|large N   (N pairs, order alternated)
e.g. git archive <old> | tar -x -C /tmp/old; python benchmarks/extract_ab.py /tmp/old . /tmp/xs small 2
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np


def load(root, tag):
    spec = importlib.util.spec_from_file_location(f"xs_{tag}", Path(root).resolve() / "benchmarks" / "extract_slides.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


old, new = load(sys.argv[1], "old"), load(sys.argv[2], "new")
work, cohort, n = Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])


class A:
    encoder, precision, batch, workers = "resnet50:layer3", "auto", None, None


store = work / ("small-store-1000" if cohort == "small" else "large-store-1000")
cache = work / "calibration-cache"
imgs = new.decoded_tiles(store)
res = {"old": [], "new": [], "bare": []}


def bare():
    la = os.getloadavg()[0]
    r, c = new.bare_rate("resnet50", "layer3", imgs, "bf16", True, 64)
    res["bare"].append({"tiles_per_s": round(r, 2), "cpu_ms": round(c, 1), "load": round(la, 2)})
    print("bare", res["bare"][-1], flush=True)


bare()
for i in range(n):
    for tag, m in (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old)):
        r = m.whole_process(store, work / f"ab-{tag}-run", cache, A)
        d = {k: r[k] for k in ("wall_s", "whole_tiles_per_s", "loop_tiles_per_s", "cpu_ms_per_tile",
                               "loop_cpu_ms_per_tile", "load_before", "precision", "calibration")}
        d["fixed_s"] = round(r["wall_s"] - r["timings"]["loop_s"], 2)
        res[tag].append(d)
        print(tag, d, flush=True)
bare()
ref = float(np.mean([b["tiles_per_s"] for b in res["bare"]]))
ref_cpu = float(np.mean([b["cpu_ms"] for b in res["bare"]]))
for tag in ("old", "new"):
    for d in res[tag]:
        d["whole/bare"] = round(d["whole_tiles_per_s"] / ref, 3)
        d["loop/bare"] = round(d["loop_tiles_per_s"] / ref, 3)
        d["loop/bare cpu"] = round(ref_cpu / d["loop_cpu_ms_per_tile"], 3)
    print(tag, {k: [d[k] for d in res[tag]] for k in ("whole/bare", "loop/bare", "loop/bare cpu", "fixed_s", "wall_s")})
print("bare mean", round(ref, 2), "cpu", round(ref_cpu, 1))
print("JSON " + json.dumps(res))
