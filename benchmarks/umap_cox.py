"""Two fits around the models, each against the library call it replaced, measured in one run.

1. UMAP in a fresh process (what every `hefeat umap` CLI call is): umap-learn's own call (NNDescent / its exact
   small-data path, numba compiling per process) vs hefeat.explore.umap_embed.umap_layout (faiss exact neighbours,
   umap-learn's compiles in numba's disk cache; one untimed process first fills that cache), at --points rows.
2. The MIL mean-pool baseline's ridge Cox penalty grid (17 penalties, warm starts, strongest first) on one
   training fold: scipy L-BFGS (the former solver) vs hefeat's `_fit_cox` (Newton up to NEWTON_MAX_ROWS rows, the
   same L-BFGS above), with the objective gap.

    python benchmarks/umap_cox.py [--points 300 5000] [--patients 130 250 400] [--dim 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

UMAP_CHILD = """
import sys, time, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import numpy as np
n, which = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
C = rng.normal(size=(8, 50)) * 2
X = (C[rng.integers(0, 8, n)] + rng.normal(size=(n, 50))).astype(np.float32)
if which == "umap-learn":
    import umap
    umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(X)
else:
    from hefeat.explore.umap_embed import umap_layout
    umap_layout(X, n_neighbors=15, min_dist=0.1, seed=0)
print(time.perf_counter() - t0)
"""


def fresh_process_umap(n: int, which: str) -> float:
    """Seconds of one fresh Python process that imports, builds n rows and lays them out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", UMAP_CHILD, str(n), which], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cox_grid(n: int, d: int) -> tuple[float, float, float]:
    """(L-BFGS seconds, Newton seconds, max objective gap Newton - L-BFGS) over the baseline's penalty grid."""
    from scipy.optimize import minimize

    from hefeat.learn.mil.survival import COX_L2_GRID, _fit_cox, _row_space, cox_objective

    r = np.random.default_rng(0)
    X = r.normal(size=(n, d))
    t, c = r.exponential(1 / np.exp(X[:, :3].sum(1))), r.exponential(2.0, n)
    t, e = np.minimum(t, c), (t <= c).astype(float)
    V = _row_space(X)
    Z = X @ V
    grid = np.sort(COX_L2_GRID)[::-1]
    t0, g, lb = time.perf_counter(), None, []
    for l2 in grid:  # the former solver, warm-started the same way
        g0 = np.zeros(Z.shape[1]) if g is None else g
        g = minimize(cox_objective, g0, args=(Z, t, e, l2), jac=True, method="L-BFGS-B",
                     options={"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-14}).x
        lb.append(cox_objective(g, Z, t, e, l2)[0])
    t1, beta, nw = time.perf_counter(), None, []
    for l2 in grid:
        beta = _fit_cox(X, t, e, l2, beta, V)
        nw.append(cox_objective(V.T @ beta, Z, t, e, l2)[0])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(np.max(np.array(nw) - np.array(lb)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs="+", default=[300, 5000])
    ap.add_argument("--patients", type=int, nargs="+", default=[130, 250, 400])
    ap.add_argument("--dim", type=int, default=256)
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    fresh_process_umap(min(a.points), "hefeat")  # fills numba's disk cache with umap-learn's compiles, untimed
    for n in a.points:
        base, ours = fresh_process_umap(n, "umap-learn"), fresh_process_umap(n, "hefeat")
        print(f"UMAP {n:>7,} x 50, fresh process: umap-learn {base:6.1f} s   hefeat {ours:6.1f} s   "
              f"ratio {base / ours:5.1f}x")
    from hefeat.learn.threads import training_threads

    with training_threads(0.0):  # as the baseline runs: one BLAS thread
        for n in a.patients:
            lb, nw, gap = cox_grid(n, a.dim)
            print(f"ridge Cox grid, {n} patients x {a.dim}-d, 17 penalties: L-BFGS {lb:6.2f} s   hefeat {nw:6.2f} s   "
                  f"ratio {lb / nw:5.1f}x   objective gap (hefeat - L-BFGS, max) {gap:.1e}")


if __name__ == "__main__":
    main()
