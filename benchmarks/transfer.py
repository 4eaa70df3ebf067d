"""Transfer (HE2RNA's MSI experiment) on the demo cohort: seconds per A/B split under thread policies.

Builds the demo cohort's store once (24 synthetic slides, the demo's tiling and encoder) in
--workdir, fits the source expression model, then runs `fit transfer --b-shares 0.5` in a fresh
process per thread policy (thread pools are fixed when a process starts them):
  library default    one process, torch and BLAS each on every core (what ran > 15 min on the demo)
  BLAS 1 thread      one process, torch on every core, BLAS single-threaded
  single-threaded    one process, torch 1 thread, BLAS 1 thread
  processes          splits in parallel processes, one per core, each single-threaded
  hefeat policy      hefeat.learn.threads as shipped: processes on idle cores, else single-threaded here
Prints seconds per split and each policy's speed-up over the library default (one run).

    python benchmarks/transfer.py --splits 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {
    "library default": {"HEFEAT_TORCH_THREADS": "0", "HEFEAT_BLAS_THREADS": "0", "HEFEAT_JOBS": "1"},
    "BLAS 1 thread": {"HEFEAT_TORCH_THREADS": "0", "HEFEAT_BLAS_THREADS": "1", "HEFEAT_JOBS": "1"},
    "single-threaded": {"HEFEAT_TORCH_THREADS": "1", "HEFEAT_BLAS_THREADS": "1", "HEFEAT_JOBS": "1"},
    "processes": {"HEFEAT_JOBS": str(len(os.sched_getaffinity(0)))},
    "hefeat policy": {},
}

CHILD = """
import json, sys, time
from hefeat.store.catalog import Store
from hefeat.learn.registry import make_params
from hefeat.learn.threads import thread_policy
from hefeat.learn.transfer import TransferParams, fit_transfer
st = Store(sys.argv[1])
p = make_params(TransferParams, json.loads(sys.argv[2]))
t = time.perf_counter()
r = fit_transfer(st, p, "bench")
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "per_split": dt / (p.n_splits * len(p.b_shares)), "policy": thread_policy(0),
                  "auc": {k: v for k, v in r.summary.items() if k.startswith("auc_")}}))
"""


def build(workdir: Path) -> tuple[str, str]:
    """The demo cohort's store (made once) and its source expression model."""
    import glob

    from hefeat.demo_stages import DEMO_ENCODER
    from hefeat.extract.pipeline import run_extraction
    from hefeat.learn.registry import fit_model
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.synth import make_cohort
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_clinical, ingest_expression

    data, root = workdir / "data", workdir / "store"
    if not (data / "truth.json").exists():
        make_cohort(data, n_slides=24, seed=0)
    st = Store.init(root)
    ingest_slides(st, sorted(glob.glob(str(data / "slides" / "*.tiff"))))
    ingest_clinical(st, data / "clinical.csv")
    ingest_expression(st, data / "expression.parquet")
    tid = run_tiling(st, TilingParams(mpp=0.5, size=224)).extra["tiling_id"]
    eid = run_extraction(st, tiling_id=tid, **DEMO_ENCODER).extra["extraction_id"]
    src = fit_model(st, "genes", {"extraction_id": eid})
    return str(root), src["model_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/hefeat-transfer-bench")
    ap.add_argument("--splits", type=int, default=4, help="A/B splits per policy (the CLI default is 10)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the policies")
    ap.add_argument("--b-shares", default="0.5")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root, src = build(Path(a.workdir))
    params = {"from_model": src, "label": "msi_status", "b_shares": [float(x) for x in a.b_shares.split(",")],
              "n_splits": a.splits}
    res = {"date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg(), "cores": len(os.sched_getaffinity(0)),
           "setup": f"demo cohort (24 slides), b_shares {a.b_shares}, {a.splits} splits, defaults otherwise"}
    chosen = [x.strip() for x in a.policies.split(",")]
    for name in chosen:
        env = POLICIES[name]
        e = {k: v for k, v in os.environ.items() if not k.startswith(("HEFEAT_", "OMP_", "OPENBLAS_", "MKL_"))}
        e.update(env)
        out = subprocess.run([sys.executable, "-c", CHILD, root, json.dumps(params)], env=e, capture_output=True,
                             text=True, check=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = res[chosen[0]]["per_split"]
    for name in chosen:
        res[name][f"speedup_vs_{chosen[0].replace(' ', '_')}"] = round(base / res[name]["per_split"], 2)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
