"""The store at cohort scale: fabricated stores of 100 / 1,000 / 10,000 slides in the real formats.

Each store is written through hefeat's own write functions (slide ingest, the per-slide runner,
the feature-file writer, expression ingest), so the fabricator follows format changes. Per size it
times, through the CLI (a fresh process each, as a user runs it) and the public Python API:

  hefeat status · SELECT count(*) FROM tiles · a one-slide query · a tiles x status join ·
  opening a store · load_features for 1 slide and for 10 % of slides (GB/s of stored features) ·
  fit genes (all genes of the fabricated table) · with --neighbors, at the largest size only:
  neighbors build over every tile (20M x 256 at 10,000 slides) and neighbors query.

Every command's peak RSS is the child's own (wait4). Medians of --repeat runs; one run for fit and build.

Quick run (≈ 3 min):      python benchmarks/store_scale.py --sizes 100,1000
Full run (≈ 1 h, 11 GB):  python benchmarks/store_scale.py --sizes 100,1000,10000 --neighbors
Stores are kept under --workdir; --reuse skips fabricating a store whose parameters match and that
this same commit fabricated (a store made by older code hides what the current writers do). The
fabricator checks what the writers left: `loose_after_writers` counts the files a reader still has
to plan around (0 everywhere when compaction works).
Run under `flock /tmp/hefeat-bench.lock` so two benchmarks never overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
FORMAT = 2  # bump when the fabricated content changes (not when hefeat's formats change: --reuse is opt-in)


# ----------------------------------------------------------------------------------------------
# Fabrication (through the library's write functions)
# ----------------------------------------------------------------------------------------------
def _tiny_slide(path: Path) -> Path:
    from hefeat.slides.synth import write_pyramid_tiff

    if not path.exists():
        rgb = np.random.default_rng(0).integers(150, 230, (512, 512, 3), dtype=np.uint8)
        write_pyramid_tiff(path, rgb, 0.5)
    return path


def _tile_counts(n: int, tiles: tuple[int, int], seed: int) -> np.ndarray:
    lo, hi = tiles
    return np.random.default_rng(seed).integers(lo, hi + 1, n) if hi > lo else np.full(n, lo)


def _slide_latent(seed: int, n: int, k: int = 8) -> np.ndarray:
    return np.random.default_rng(seed + 11).normal(size=(n, k))


def _tile_frame(tid: str, sid: str, n: int, rng: np.random.Generator):
    import pandas as pd

    side = int(np.ceil(np.sqrt(n)))
    row, col = np.divmod(np.arange(n), side)
    f32 = np.float32
    return pd.DataFrame({
        "tiling_id": tid, "slide_id": sid, "tile_id": np.arange(n, dtype=np.int64),
        "x": (col * 448).astype(np.int64), "y": (row * 448).astype(np.int64), "size0": 448.0,
        "row": row.astype(np.int32), "col": col.astype(np.int32),
        "tissue_frac": rng.uniform(0.5, 1, n).astype(f32), "sharpness": rng.gamma(2, 50, n).astype(f32),
        "mean_r": rng.normal(200, 10, n).astype(f32), "mean_g": rng.normal(150, 10, n).astype(f32),
        "mean_b": rng.normal(190, 10, n).astype(f32), "background_frac": rng.uniform(0, 0.5, n).astype(f32),
        "density": rng.uniform(0, 1, n).astype(f32),
    })


class _Features:
    """Clustered tile embeddings: 256 global tissue-state centres, each slide a mixture of 12, shifted by its latent."""

    def __init__(self, dim: int, seed: int):
        g = np.random.default_rng(seed)
        self.centres = g.normal(size=(256, dim)).astype(np.float32)
        self.mix = g.normal(size=(8, dim)).astype(np.float32) * 0.5
        self.dim, self.seed = dim, seed

    def slide(self, i: int, n: int, latent: np.ndarray) -> np.ndarray:
        g = np.random.default_rng([self.seed, i])
        states = g.choice(256, 12, replace=False)
        X = self.centres[states[g.integers(0, 12, n)]]
        X += latent @ self.mix
        X += g.standard_normal((n, self.dim), dtype=np.float32) * 0.6
        return X


def fabricate(root: Path, n_slides: int, *, tiles: tuple[int, int], dim: int, genes: int, seed: int) -> dict:
    """A store with n_slides slides, one tiling, one extraction (fp16) and an expression table; returns timings."""
    import pandas as pd

    from hefeat.extract.pipeline import __version__
    from hefeat.runner import run_slides
    from hefeat.slides.run import ingest_slides, tiling_id
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.atomic import write_json
    from hefeat.store.catalog import Store
    from hefeat.store.features import FeatureFileWriter
    from hefeat.store.ids import array_digest, content_id, frame_fingerprint
    from hefeat.store.ingest import ingest_expression
    from hefeat.store.runs import timestamp
    from hefeat.store.tables import write_parquet

    if root.exists():
        shutil.rmtree(root)
    t_all = time.perf_counter()
    times = {}
    st = Store.init(root)
    src = _tiny_slide(root.parent / "tiny-slide.tiff")
    sdir = root.parent / f"slides-{n_slides}"
    sdir.mkdir(exist_ok=True)
    ids = [f"S{i:05d}" for i in range(n_slides)]
    paths = []
    for sid in ids:
        p = sdir / f"{sid}.tiff"
        if not p.exists():
            os.link(src, p)
        paths.append(str(p))
    g = np.random.default_rng(seed)
    latent = _slide_latent(seed, n_slides)
    patients = [f"P{i:05d}" for i in range(n_slides)]
    for i in np.flatnonzero(g.random(n_slides) < 0.1)[1:]:  # ~10 % of patients have a second slide
        patients[i] = patients[i - 1]
    manifest = root.parent / f"manifest-{n_slides}.csv"
    pd.DataFrame({"path": paths, "slide_id": ids, "patient_id": patients,
                  "site": [f"site{int(x):02d}" for x in g.integers(0, 20, n_slides)]}).to_csv(manifest, index=False)
    t = time.perf_counter()
    ingest_slides(st, paths, manifest=manifest)
    times["ingest_slides_s"] = time.perf_counter() - t

    # Expression (before any status file exists): genes driven by the slides' latent factors, samples = slides.
    W = g.normal(size=(latent.shape[1], genes)) * (g.random(genes) < 0.3)
    Y = np.exp(latent @ W * 0.3 + g.normal(size=(n_slides, genes)) * 0.5 + 2).astype(np.float32)
    gene_names = [f"G{j:05d}" for j in range(genes)]
    expr = pd.DataFrame(Y, columns=gene_names)
    expr.insert(0, "sample_id", ids)
    epath = root.parent / f"expression-{n_slides}.parquet"
    expr.to_parquet(epath, index=False)
    t = time.perf_counter()
    ingest_expression(st, epath)
    times["ingest_expression_s"] = time.perf_counter() - t
    counts = dict(zip(ids, _tile_counts(n_slides, tiles, seed).tolist(), strict=True))
    params = TilingParams(mpp=0.5, size=224)
    tid = tiling_id(params)
    write_json(st.tiling_dir(tid) / "_tiling.json", {"tiling_id": tid, "mpp": params.mpp, "size": params.size,
                                                     "background": params.background, "spots": False,
                                                     "created": timestamp(), "params": params.to_dict()})

    def tile_step(task) -> dict:
        sid = task.slide_id
        df = _tile_frame(tid, sid, counts[sid], np.random.default_rng([seed, int(sid[1:]), 1]))
        write_parquet(df, st.tiles_path(tid, sid), kind="tiles")
        return {"n_tiles": len(df), "digest": frame_fingerprint(df)}

    t = time.perf_counter()
    run_slides(st, "tiling", tid, ids, tile_step)
    times["tiling_s"] = time.perf_counter() - t

    eid = content_id({"tiling": tid, "fabricated": "store_scale", "dim": dim, "seed": seed}, prefix="e")
    write_json(st.extraction_dir(eid) / "_extraction.json", {
        "extraction_id": eid, "tiling_id": tid, "encoder": "fabricated", "layer": None, "weights": "none",
        "weights_digest": "none", "dim": dim, "precision": "fp32", "tta": False, "dtype": "float16",
        "patch_size": params.size, "mpp": params.mpp, "code_version": __version__, "created": timestamp()})
    feats = _Features(dim, seed)

    def extract_step(task) -> dict:
        sid = task.slide_id
        i = int(sid[1:])
        n = counts[sid]
        X = feats.slide(i, n, latent[i].astype(np.float32))
        side = int(np.ceil(np.sqrt(n)))
        row, col = np.divmod(np.arange(n), side)
        path = st.features_path(eid, sid)
        w = FeatureFileWriter(path, n, dim, dtype="float16", coords=np.stack([col * 448, row * 448], 1),
                              attrs={"encoder": "fabricated", "dim": dim, "tiling_id": tid, "extraction_id": eid,
                                     "slide_id": sid, "patch_size_level0": 448.0})
        try:
            for a in range(0, n, 512):
                w.write(a, X[a:a + 512])
            w.commit()
        except BaseException:
            w.abort()
            raise
        return {"n_tiles": n, "dim": dim, "digest": array_digest(X.astype(np.float16))}

    t = time.perf_counter()
    run_slides(st, "extraction", eid, ids, extract_step)
    _after_extraction(st, eid)
    times["extraction_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # The writers compact as they finish (reads never do): check that they left nothing loose.
    fresh = Store(root)
    fresh.sql("SELECT count(*) FROM tiles")
    loose = {fam: len(pl.loose) + len(pl.exclude) for fam, pl in fresh.plans.items()}
    loose["records"] = fresh.status_snapshot().reread
    times["check_s"] = time.perf_counter() - t
    times["fabricate_s"] = time.perf_counter() - t_all
    info = {"slides": n_slides, "tiles": int(sum(counts.values())), "dim": dim, "genes": genes, "seed": seed,
            "tiles_per_slide": list(tiles), "tiling_id": tid, "extraction_id": eid, "format": FORMAT,
            "feature_bytes": int(sum(counts.values())) * dim * 2, "loose_after_writers": loose, "commit": git_commit(),
            **{k: round(v, 1) for k, v in times.items()}}
    (root / "_fabricated.json").write_text(json.dumps(info, indent=1))
    return info


def git_commit() -> str:
    """The commit measured (with '+dirty' when the work tree differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _after_extraction(store, eid: str) -> None:
    """What run_extraction does once its slides are written (consolidate slide aggregates, when available)."""
    from hefeat.store import features

    refresh = getattr(features, "refresh_aggregates", None)
    if refresh is not None:
        refresh(store, eid)


# ----------------------------------------------------------------------------------------------
# Measuring (each measurement a fresh child process; its peak RSS from wait4)
# ----------------------------------------------------------------------------------------------
def _limit_memory(gb: float):
    def pre():
        lim = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    return pre


def run_measured(argv: list[str], mem_gb: float, timeout: float = 3600) -> dict:
    """Run a child process: wall seconds, rc, output and its own peak RSS in MB (os.wait4 on its pid)."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    import tempfile

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env, cwd=HERE, preexec_fn=_limit_memory(mem_gb))
        deadline = t + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        sec = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return {"s": sec, "rc": p.returncode, "rss_mb": ru.ru_maxrss / 1024, "out": fo.read().decode(errors="replace"),
                "err": fe.read().decode(errors="replace")}


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hefeat.cli", *args]


def _err_line(r: dict) -> str:
    lines = [x for x in (r["err"] or r["out"]).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else f"rc {r['rc']}")[:160]


def measure_cli(name: str, args: list[str], repeat: int, mem_gb: float, timeout: float = 3600) -> dict:
    runs = [run_measured(cli(args), mem_gb, timeout) for _ in range(repeat)]
    bad = [r for r in runs if r["rc"] != 0]
    if bad:
        return {"name": name, "error": _err_line(bad[0]), "s": bad[0]["s"], "rss_mb": max(r["rss_mb"] for r in runs)}
    return {"name": name, "s": statistics.median(r["s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs),
            "out": runs[-1]["out"]}


API_SNIPPET = r"""
import json, sys, time, statistics
import numpy as np
t0 = time.perf_counter()
from hefeat.store.catalog import open_store
from hefeat.store import features as F
root, eid, what, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
res = {}
if what == "open":
    t = time.perf_counter()
    st = open_store(root)
    st.sql("SELECT count(*) FROM slides")
    res["s"] = time.perf_counter() - t
elif what == "queries":  # in one process after opening: what a notebook or the explorer pays per query
    st = open_store(root)
    st.sql("SELECT count(*) FROM slides")
    one = sys.argv[5]
    qs = {"count": "SELECT count(*) AS n FROM tiles", "one": f"SELECT * FROM tiles WHERE slide_id = '{one}'",
          "join": "SELECT st.state, count(*) AS n FROM tiles t JOIN status st ON st.stage = 'tiling' "
                  "AND st.id = t.tiling_id AND st.slide_id = t.slide_id GROUP BY 1"}
    for k, q in qs.items():
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            st.sql(q)
            times.append(time.perf_counter() - t)
        res[k] = statistics.median(times)
elif what == "imports":  # the floor of every CLI command: starting Python and importing the CLI
    import hefeat.cli  # noqa: F401
    res["s"] = time.perf_counter() - t0
else:
    st = open_store(root)
    import inspect
    has_dtype = "dtype" in inspect.signature(F.load_features).parameters
    ids = sorted(p.stem for p in st.extraction_dir(eid).glob("*.h5"))
    g = np.random.default_rng(1)
    sel = [ids[int(g.integers(len(ids)))]] if what == "one" else sorted(g.choice(ids, max(1, len(ids) // 10), replace=False).tolist())
    dtypes = ["float32", "float16"] if has_dtype else ["float32"]
    for dt in dtypes:
        kw = {"dtype": dt} if has_dtype else {}
        times = []
        for i in range(repeat + 1):  # the first call warms the page cache and the aggregate/offset files
            t = time.perf_counter()
            meta, X = F.load_features(st, eid, slides=sel, **kw)
            times.append(time.perf_counter() - t)
        res[dt] = {"first_s": times[0], "s": statistics.median(times[1:]), "rows": int(len(X)),
                   "stored_bytes": int(len(X)) * X.shape[1] * 2, "slides": len(sel)}
        res[dt]["gb_per_s"] = res[dt]["stored_bytes"] / res[dt]["s"] / 1e9
        del meta, X
print(json.dumps(res))
"""


def measure_api(what: str, root: Path, eid: str, repeat: int, mem_gb: float, *extra: str) -> dict:
    r = run_measured([sys.executable, "-c", API_SNIPPET, str(root), eid, what, str(repeat), *extra], mem_gb)
    if r["rc"] != 0:
        return {"error": _err_line(r), "rss_mb": r["rss_mb"]}
    return {**json.loads(r["out"].strip().splitlines()[-1]), "rss_mb": r["rss_mb"]}


def measure(root: Path, info: dict, a) -> list[dict]:
    """Every measurement of one store, in order."""
    s = ["--store", str(root)]
    eid = info["extraction_id"]
    one = f"S{info['slides'] // 2:05d}"
    rows = [
        measure_cli("hefeat status", ["status", *s], a.repeat, a.mem_gb),
        measure_cli("SELECT count(*) FROM tiles", ["sql", "SELECT count(*) AS n FROM tiles", "--json", *s], a.repeat, a.mem_gb),
        measure_cli("one-slide query", ["sql", f"SELECT * FROM tiles WHERE slide_id = '{one}'", "--json", *s],
                    a.repeat, a.mem_gb),
        measure_cli("tiles x status join", ["sql", "SELECT st.state, count(*) AS n FROM tiles t JOIN status st ON "
                    "st.stage = 'tiling' AND st.id = t.tiling_id AND st.slide_id = t.slide_id GROUP BY 1", "--json", *s],
                    a.repeat, a.mem_gb),
    ]
    imp = measure_api("imports", root, eid, a.repeat, a.mem_gb)
    rows.append({"name": "python + import hefeat.cli (floor of a CLI call)",
                 **({"error": imp["error"]} if "error" in imp else {"s": imp["s"]}), "rss_mb": imp["rss_mb"]})
    o = measure_api("open", root, eid, a.repeat, a.mem_gb)
    rows.append({"name": "open a store (API)", **({"error": o["error"]} if "error" in o else {"s": o["s"]}),
                 "rss_mb": o["rss_mb"]})
    q = measure_api("queries", root, eid, a.repeat, a.mem_gb, one)
    for k, label in (("count", "count(*) FROM tiles"), ("one", "one-slide query"), ("join", "tiles x status join")):
        rows.append({"name": f"{label} (API, store open)", **({"error": q["error"]} if "error" in q else {"s": q[k]}),
                     "rss_mb": q["rss_mb"]})
    for what, label in (("one", "load_features 1 slide"), ("tenth", "load_features 10 % of slides")):
        r = measure_api(what, root, eid, a.repeat, a.mem_gb)
        if "error" in r:
            rows.append({"name": label, "error": r["error"], "rss_mb": r["rss_mb"]})
            continue
        for dt in ("float32", "float16"):
            if dt in r:
                x = r[dt]
                rows.append({"name": f"{label} ({dt})", "s": x["s"], "first_s": x["first_s"], "gb_per_s": x["gb_per_s"],
                             "rss_mb": r["rss_mb"], "note": f"{x['slides']} slides, {x['rows']:,} rows"})
    if not a.no_fit:
        rows.append(measure_cli(f"fit genes ({info['genes']} genes)", ["fit", "genes", "--extraction", eid, "--force",
                                                                        "--json", *s], 1, a.mem_gb))
    if a.neighbors and info["slides"] == max(a.sizes):
        b = measure_cli(f"neighbors build ({info['tiles'] / 1e6:.1f}M x {info['dim']})",
                        ["neighbors", "build", "--extraction", eid, "--force", "--json", *s], 1, a.mem_gb)
        if "out" in b:
            m = json.loads(b["out"].strip().splitlines()[-1])
            b["note"] = f"{m.get('type')}, recall@10 {m.get('recall_at_10')}"
        rows.append(b)
        rows.append(measure_cli("neighbors query (k=20)", ["neighbors", "query", "--extraction", eid, "--tile",
                                                          f"{one}:7", "-k", "20", "--json", *s], a.repeat, a.mem_gb))
    return rows


# ----------------------------------------------------------------------------------------------
def _fmt(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error'][:60]})"
    s = f"{r['s']:.3f} s" if r["s"] < 10 else f"{r['s']:.1f} s"
    if "gb_per_s" in r:
        s += f", {r['gb_per_s']:.2f} GB/s"
    return s


def table(results: dict[int, list[dict]]) -> str:
    sizes = sorted(results)
    names = list(dict.fromkeys(r["name"] for n in sizes for r in results[n]))
    head = "| measurement | " + " | ".join(f"{n:,} slides" for n in sizes) + " | peak RSS (largest) |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for name in names:
        cells, rss = [], ""
        for n in sizes:
            r = next((x for x in results[n] if x["name"] == name), None)
            cells.append(_fmt(r) if r else "–")
            if r and r.get("rss_mb"):
                rss = f"{r['rss_mb']:.0f} MB"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rss} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated slide counts")
    ap.add_argument("--tiles", default="2000", help="tiles per slide: N or LO:HI (uniform)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timed command (median)")
    ap.add_argument("--workdir", default="/tmp/hefeat-store-scale")
    ap.add_argument("--reuse", action="store_true", help="keep a store fabricated earlier with the same parameters")
    ap.add_argument("--neighbors", action="store_true", help="also build and query a neighbour index at the largest size")
    ap.add_argument("--no-fit", action="store_true", help="skip fit genes")
    ap.add_argument("--fabricate-only", action="store_true", help="build (or --reuse) the stores, measure nothing")
    ap.add_argument("--mem-gb", type=float, default=12.0, help="address-space cap per child (protects a shared machine)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write all results to this file")
    a = ap.parse_args()
    a.sizes = [int(x) for x in a.sizes.split(",")]
    lo, _, hi = a.tiles.partition(":")
    tiles = (int(lo), int(hi or lo))
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_before": os.getloadavg(), "python": platform.python_version(), "commit": git_commit()}
    print(json.dumps(header), flush=True)
    results, infos = {}, {}
    for n in a.sizes:
        root = work / f"store-{n}"
        want = {"slides": n, "tiles_per_slide": list(tiles), "dim": a.dim, "genes": a.genes, "seed": a.seed, "format": FORMAT}
        old = json.loads((root / "_fabricated.json").read_text()) if (root / "_fabricated.json").exists() else None
        if a.reuse and old and old.get("commit") != header["commit"]:
            print(f"[{n}] not reusing {root}: fabricated by {old.get('commit')}, this is {header['commit']}", flush=True)
            old = None
        if a.reuse and old and all(old.get(k) == v for k, v in want.items()):
            info = old
            print(f"[{n}] reusing {root}", flush=True)
        else:
            print(f"[{n}] fabricating {root} ...", flush=True)
            info = fabricate(root, n, tiles=tiles, dim=a.dim, genes=a.genes, seed=a.seed)
            print(f"[{n}] fabricated: {json.dumps(info)}", flush=True)
        infos[n] = info
        if a.fabricate_only:
            continue
        results[n] = measure(root, info, a)
        for r in results[n]:
            print(f"[{n}] {r['name']}: {_fmt(r)}  rss {r.get('rss_mb', 0):.0f} MB  {r.get('note', '')}", flush=True)
    header["load_after"] = os.getloadavg()
    if a.fabricate_only:
        return
    print()
    print(table(results))
    print(f"\nload average before {header['load_before']}, after {header['load_after']}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"header": header, "stores": infos, "results": {
            n: [{k: v for k, v in r.items() if k != "out"} for r in rs] for n, rs in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
