"""Transcriptome-scale per-gene heads and HE2RNA epoch time, on synthetic arrays (ratios measured in one run).

- Ridge core: `fit_ridge_heads` (float32 GEMMs, float64 where accuracy needs it) on all genes, and on a
  subset of genes against scikit-learn's `RidgeCV(alpha_per_target=True)` on the same arrays (the
  same efficient-LOO estimator, vectorised over targets in float64): time ratio, and whether the chosen
  penalties are identical and predictions equal to 1e-6 relative.
- Workload of `fit genes` (5-fold CV + final refit + one permutation of the CV = 11 ridge fits) on the
  arrays: seconds and peak RSS of this process.
- With --store/--extraction: `hefeat fit genes --permutations 1 --force` on a fabricated store in a child
  process (wall seconds, peak RSS), e.g. the 10,000-slide store of benchmarks/store_scale.py; --make-store
  copies such a store (features hard-linked) with a --genes-gene expression table for it.
- HE2RNA: one training epoch on super-tiles for 1,000 slides x 100 x 2,048 on the CPU.

Issue-22 targets (2-core CPU): 20,000 genes x 10,000 samples x 256-d, CV + final + permutation null
<= 60 s and <= 8 GB; 1,024-d <= 3 min; 1,000 samples <= 12 s.
Run: python benchmarks/genes.py --genes 20000 --slides 10000 --dim 256 --subset 1000 --no-he2rna
     python benchmarks/genes.py --genes 20000 --slides 1000 --dim 256 --no-he2rna
     python benchmarks/genes.py --genes 20000 --make-store /tmp/hefeat-store-scale/store-10000 /tmp/g20k-10000
     python benchmarks/genes.py --store /tmp/g20k-10000 --no-he2rna --no-arrays
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arrays_benchmark(a, res: dict) -> None:
    """Ridge core vs scikit-learn on a subset, then the 11-fit workload of `fit genes` on all genes."""
    from sklearn.linear_model import RidgeCV

    from hefeat.learn.ridge import RidgeBasis, fit_ridge_heads

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(a.slides, 16))
    X = (latent @ rng.normal(size=(16, a.dim)) + rng.normal(size=(a.slides, a.dim))).astype(np.float32)
    W = rng.normal(size=(16, a.genes)) * (rng.random(a.genes) < 0.4) * 0.3
    Y = np.log1p(np.exp(latent @ W + rng.normal(size=(a.slides, a.genes)) * 0.5 + 2))  # float64, like fit genes
    alphas = np.logspace(-2, 5, a.alphas)
    res["rss_after_data_mb"] = round(_rss_mb())
    sub = Y[:, : a.subset]
    t = time.perf_counter()
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(X.astype(np.float64), sub)
    t_sk = time.perf_counter() - t
    t = time.perf_counter()
    ours = fit_ridge_heads(X, sub, alphas=alphas)
    t_ours = time.perf_counter() - t
    pred_ref, pred = ref.predict(X[:200].astype(np.float64)), ours.predict(X[:200])
    res["subset_genes"] = sub.shape[1]
    res["sklearn_ridgecv_subset_s"] = round(t_sk, 2)
    res["ours_subset_s"] = round(t_ours, 2)
    res["ratio_sklearn_over_ours"] = round(t_sk / t_ours, 1)
    res["same_penalties"] = float((ours.alpha == ref.alpha_).mean())
    res["max_rel_prediction_diff"] = float(np.max(np.abs(pred - pred_ref)) / np.max(np.abs(pred_ref)))
    t = time.perf_counter()
    fit_ridge_heads(X, Y, alphas=alphas)
    res["ours_all_genes_one_fit_s"] = round(time.perf_counter() - t, 2)
    # fit genes' workload: 5 folds (80 % of the samples each) + the final fit, then the CV again on permuted
    # targets; as fit genes runs it, each fold's basis is built once and serves both CVs.
    folds = np.array_split(rng.permutation(a.slides), 5)
    perm = rng.permutation(a.slides)
    t = time.perf_counter()
    for f in folds:
        train = np.setdiff1d(np.arange(a.slides), f)
        basis = RidgeBasis(X[train], alphas)
        basis.fit(Y, rows=train)
        basis.fit(Y, rows=perm[train])  # the permuted targets' training rows, without copying Y
    RidgeBasis(X, alphas).fit(Y)
    res["fit_genes_workload_11_fits_s"] = round(time.perf_counter() - t, 1)
    res["cross_terms_scored_per_gene_last_fold"] = round(basis.pairs_scored / max(basis.genes_scored, 1), 2)
    res["peak_rss_mb"] = round(_rss_mb())


def make_store(a) -> None:
    """A copy of a fabricated store (feature files hard-linked, the rest copied) whose `expression` dataset has
    --genes genes, drawn like store_scale.py's (from the same slide latents): `fit genes` at transcriptome scale
    on the 10,000-slide store without fabricating it again. The source store is only read."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from store_scale import _slide_latent

    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ExpressionMatrix, ingest_matrix

    src, dst = Path(a.make_store[0]), Path(a.make_store[1])
    if dst.exists():
        raise SystemExit(f"{dst} exists; remove it first")
    info = json.loads((src / "_fabricated.json").read_text())
    t = time.perf_counter()
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name == "features":
            shutil.copytree(item, dst / item.name, copy_function=os.link)  # immutable once written: share them
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    st = Store(dst)
    ids = st.sql("SELECT slide_id FROM slides ORDER BY slide_id")["slide_id"].tolist()
    g = np.random.default_rng([info["seed"], a.genes])
    latent = _slide_latent(info["seed"], len(ids))
    Y = np.empty((len(ids), a.genes), np.float32)
    W = g.normal(size=(latent.shape[1], a.genes)) * (g.random(a.genes) < 0.3)
    for r in range(0, len(ids), 1000):
        Y[r:r + 1000] = np.exp(latent[r:r + 1000] @ W * 0.3 + g.normal(size=(len(Y[r:r + 1000]), a.genes)) * 0.5 + 2)
    genes = [f"G{j:05d}" for j in range(a.genes)]
    recipe = dst / "expression-fabricated.json"  # the "source file" the ingest records
    recipe.write_text(json.dumps({"genes": a.genes, "seed": [info["seed"], a.genes], "like": "store_scale.py"}))
    ingest_matrix(st, ExpressionMatrix(ids, genes, Y, "samples x genes"), recipe, dataset="expression")
    info.update(genes=a.genes, copied_from=str(src), copy_s=round(time.perf_counter() - t, 1))
    (dst / "_fabricated.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def store_benchmark(a, res: dict) -> None:
    """`hefeat fit genes --permutations 1 --force` in a child process: wall seconds and peak RSS."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    eid = a.extraction or json.loads((Path(a.store) / "_fabricated.json").read_text())["extraction_id"]
    cmd = [sys.executable, "-m", "hefeat.cli", "fit", "genes", "--store", a.store, "--extraction", eid,
           "--permutations", "1", "--force", "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res["fit_genes_cli_s"] = round(time.perf_counter() - t, 1)
    res["fit_genes_cli_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if r.returncode:
        res["fit_genes_cli_error"] = r.stderr.strip().splitlines()[-1:] or ["?"]
    else:
        out = json.loads(r.stdout.strip().splitlines()[-1])
        res["fit_genes_cli"] = {k: out.get(k) for k in ("n_samples", "n_genes", "seconds", "model_id")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--slides", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--alphas", type=int, default=15, help="candidate penalties (fit genes' default grid has 15)")
    ap.add_argument("--subset", type=int, default=1000, help="genes fitted by scikit-learn's RidgeCV too")
    ap.add_argument("--he2rna-slides", type=int, default=1_000)
    ap.add_argument("--no-he2rna", action="store_true")
    ap.add_argument("--no-arrays", action="store_true", help="skip the synthetic-array ridge measurements")
    ap.add_argument("--store", default=None, help="a store to run `hefeat fit genes` on (child process)")
    ap.add_argument("--extraction", default=None, help="default: the store's _fabricated.json extraction")
    ap.add_argument("--make-store", nargs=2, metavar=("SRC", "DST"), default=None,
                    help="copy fabricated store SRC to DST (features hard-linked) with --genes genes, then exit")
    a = ap.parse_args()
    if a.make_store:
        make_store(a)
        return
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load_before": [round(v, 2) for v in os.getloadavg()], "alphas": a.alphas}
    if not a.no_arrays:  # the synthetic arrays' problem size (a --store run reports its own n_samples, n_genes)
        res.update(genes=a.genes, slides=a.slides, dim=a.dim)
        arrays_benchmark(a, res)
    if a.store:
        store_benchmark(a, res)
    if a.no_he2rna:
        res["load_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(res, indent=1))
        return

    # HE2RNA: one epoch on super-tiles.
    import torch

    from hefeat.learn.he2rna import He2rnaParams
    from hefeat.learn.nets import make_net, topk_mean
    from hefeat.learn.threads import training_threads

    n, T, d, G = a.he2rna_slides, 100, a.dim, 2_000
    Xs = torch.randn(n, d, T)
    M = torch.ones(n, T, dtype=torch.bool)
    Yt = torch.randn(n, G)
    p = He2rnaParams(extraction_id="bench")
    net = make_net(d, G, p.hidden, p.dropout)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    g = np.random.default_rng(0)
    with training_threads():
        t = time.perf_counter()
        for idx in np.array_split(g.permutation(n), n // p.batch_size):
            k = int(g.choice(p.ks))
            loss = ((topk_mean(net(Xs[idx]), M[idx], k) - Yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        res["he2rna_epoch_s"] = round(time.perf_counter() - t, 2)
    res["he2rna_setup"] = f"{n} slides x {T} super-tiles x {d}-d, {G} genes, batch {p.batch_size}, hidden {p.hidden}"
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
