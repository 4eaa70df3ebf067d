"""One attention-MIL training epoch over a fabricated store, against the bare read of the same bytes (issue 19).

The store is store_scale.py's fabrication (its own write functions: slide ingest, the per-slide runner,
the feature-file writer; float16 features, `--tiles` tiles x `--dim` per slide), plus a random binary
clinical label. In one process it times:

  bare read  the rows one epoch samples (the same `tile_sample` draws), read as stored (float16), nothing else
  epoch      one ABMIL training epoch over every slide (read + float16 -> float32 + forward/backward + Adam),
             through the method's own fold trainer (`hefeat.learn.mil.training._Fold.fit`, one epoch, one validation bag)

and prints both, their ratio, slides/s and the process's peak RSS.

Quick check (≈ 1 min):   python benchmarks/mil.py --slides 200
Issue figure (≈ 15 min to fabricate 10 GB once, then the epoch):
    flock /tmp/hefeat-bench.lock python benchmarks/mil.py --slides 10000 --tiles 2000 --dim 256 --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "benchmarks"))


def _store(a) -> tuple[Path, dict]:
    from store_scale import FORMAT, fabricate

    if a.store:  # a store fabricated by store_scale.py (same fabrication), e.g. its 10,000-slide store
        root = Path(a.store)
        return root, json.loads((root / "_fabricated.json").read_text())
    root = Path(a.workdir) / f"mil-{a.slides}"
    meta = root / "_fabricated.json"
    want = {"slides": a.slides, "tiles_per_slide": [a.tiles, a.tiles], "dim": a.dim, "seed": a.seed, "format": FORMAT}
    if a.reuse and meta.exists():
        info = json.loads(meta.read_text())
        if all(info.get(k) == v for k, v in want.items()):
            return root, info
    info = fabricate(root, a.slides, tiles=(a.tiles, a.tiles), dim=a.dim, genes=10, seed=a.seed)
    return root, info


def _label(store, seed: int) -> None:

    from hefeat.store.ingest import ingest_clinical

    sl = store.sql("SELECT slide_id FROM slides ORDER BY slide_id")
    sl["label"] = np.random.default_rng(seed).integers(0, 2, len(sl))
    path = store.root.parent / f"clinical-{len(sl)}.csv"
    sl.to_csv(path, index=False)
    ingest_clinical(store, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--max-tiles", type=int, default=512, help="training tiles sampled per bag (the method's default)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/hefeat-bench-mil")
    ap.add_argument("--reuse", action="store_true", help="reuse a fabricated store of the same parameters")
    ap.add_argument("--store", default=None, help="use this store fabricated by store_scale.py (its slides, tiles and dim)")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from hefeat.learn import mil
    from hefeat.learn.bags import BagReader, make_bags, tile_sample
    from hefeat.learn.threads import training_threads
    from hefeat.store.catalog import Store
    from hefeat.store.features import read_slide_rows

    t0 = time.perf_counter()
    root, info = _store(a)
    fab_s = time.perf_counter() - t0
    st = Store(root)
    _label(st, a.seed)
    eid = info["extraction_id"]
    p = mil.AbmilParams(extraction_id=eid, label="label", max_tiles=a.max_tiles, batch_size=a.batch_size,
                        hidden=a.hidden, epochs=1, baseline=False, seed=a.seed)
    df, _ = mil._bag_table(st, p)
    first = df.drop_duplicates("slide_id").reset_index(drop=True)
    tg = mil._targets(first, p)
    bags = make_bags(st, eid, first["slide_id"].to_numpy(), first["patient_id"].to_numpy(),
                     [[s] for s in first["slide_id"]])
    n = len(bags)
    train, val = np.arange(n - 1), np.arange(n - 1, n)
    fold_seed = 12345

    # The rows the epoch will sample (fit draws them from default_rng([fold_seed, epoch]) the same way).
    rng = np.random.default_rng([fold_seed, 0])
    order = rng.permutation(train)
    rows = {int(i): tile_sample(int(bags.n_tiles[i]), a.max_tiles, rng) for i in order}
    t = time.perf_counter()
    nbytes = 0
    for i in order:
        f = bags.files[int(i)][0]
        got = read_slide_rows(f, rows[int(i)], dtype=f.dtype)
        nbytes += got.nbytes
    bare_s = time.perf_counter() - t

    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # one-time imports (torch._dynamo) outside the timing
    reader = BagReader(bags, cache_bytes=0)  # stream from the files, as at 10,000 slides
    agg = mil._aggregates(st, eid)
    fm = mil._Fold("abmil", p, tg, bags.dim, train, 1, mil._tile_moments(agg, bags.slides, train))
    flops = 6.0 * a.batch_size * a.max_tiles * bags.dim * a.hidden
    t = time.perf_counter()
    with training_threads(flops) as pol:
        fm.fit(reader, train, val, fold_seed, lambda i: None)
    epoch_s = time.perf_counter() - t
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores",
           "slides": n, "tiles_per_slide": a.tiles, "dim": a.dim, "max_tiles": a.max_tiles, "batch_size": a.batch_size,
           "hidden": a.hidden, "threads": pol, "fabricate_s": round(fab_s, 1),
           "bare_read_s": round(bare_s, 2), "bare_read_gb_s": round(nbytes / bare_s / 1e9, 2),
           "epoch_s": round(epoch_s, 2), "epoch_over_read": round(epoch_s / bare_s, 2),
           "slides_per_s": round(n / epoch_s, 1), "peak_rss_gb": round(rss_gb, 2)}
    print(f"{n} slides x {a.tiles} tiles x {a.dim}-d (float16), {a.max_tiles} tiles sampled per bag, batch {a.batch_size}:")
    print(f"  bare read of the sampled rows  {bare_s:7.2f} s  ({nbytes / bare_s / 1e9:.2f} GB/s)")
    print(f"  one ABMIL training epoch       {epoch_s:7.2f} s  ({n / epoch_s:.0f} slides/s, "
          f"{epoch_s / bare_s:.1f}x the bare read); peak RSS {rss_gb:.2f} GB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
