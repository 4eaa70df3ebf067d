"""Transcriptome-scale per-gene heads and HE2RNA epoch time, on synthetic arrays.

- 20,000 genes x 1,000 slides x 2,048-d features, per-gene penalty over 10 candidates: time of our
  one-SVD LOO path, and its ratio to fitting scikit-learn Ridge gene by gene (measured on a subset,
  extrapolated; that loop still has to pick penalties, so it is timed with the same 10 candidates
  via RidgeCV per gene on the subset).
- HE2RNA: one training epoch on super-tiles for 1,000 slides x 100 x 2,048 on the CPU.
Run: python benchmarks/genes.py [--genes 20000 --slides 1000 --dim 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--slides", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=2_048)
    ap.add_argument("--alphas", type=int, default=10)
    ap.add_argument("--subset", type=int, default=50, help="genes fitted one by one for the naive loop")
    ap.add_argument("--he2rna-slides", type=int, default=1_000)
    a = ap.parse_args()
    from sklearn.linear_model import RidgeCV

    from hefeat.learn.ridge import fit_ridge_heads

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(a.slides, 16))
    X = (latent @ rng.normal(size=(16, a.dim)) + rng.normal(size=(a.slides, a.dim))).astype(np.float32)
    W = rng.normal(size=(16, a.genes)) * (rng.random(a.genes) < 0.4)
    Y = (latent @ W + rng.normal(size=(a.slides, a.genes))).astype(np.float32)
    alphas = np.logspace(-1, 5, a.alphas)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "genes": a.genes, "slides": a.slides,
           "dim": a.dim, "alphas": a.alphas}
    for dt in (np.float32, np.float64):
        t = time.perf_counter()
        fit = fit_ridge_heads(X, Y, alphas=alphas, dtype=dt)
        res[f"ours_{np.dtype(dt).name}_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for j in range(a.subset):
        RidgeCV(alphas=alphas).fit(X, Y[:, j])
    per_gene = (time.perf_counter() - t) / a.subset
    res["naive_ridgecv_per_gene_s"] = round(per_gene, 4)
    res["naive_extrapolated_s"] = round(per_gene * a.genes, 1)
    res["speedup_float32"] = round(per_gene * a.genes / res["ours_float32_s"], 1)
    res["speedup_float64"] = round(per_gene * a.genes / res["ours_float64_s"], 1)
    del fit

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
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
