"""What one multi-output network saves over EMO's one network per gene, from counted FLOPs.

Wang et al. trained one Inception-v3 per gene (17,695 genes, ~300,000 GPU-hours). A network whose
last layer has one output per gene costs one backbone pass plus a (dim x genes) linear layer per
image; the per-gene approach costs genes x (backbone + a 1-output layer). FLOPs are counted by
torch's FlopCounterMode on one forward pass; training (forward + backward) scales both sides
alike, so the ratio holds for training as long as each network sees the same number of images
(the stated assumption: our network gets the per-gene network's image budget, not genes times it).
"""

from __future__ import annotations

PAPER_GENES = 17_695
PAPER_GPU_HOURS = 300_000.0


def forward_flops(net, input_size: int) -> int:
    """FLOPs of one forward pass of `net` on a (1, 3, input_size, input_size) input, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = net.training
    net.eval()
    x = torch.zeros(1, 3, input_size, input_size, device=next(net.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    net.train(was)
    return int(fc.get_total_flops())


def cost_ratio(backbone_flops: int, dim: int, genes: int) -> float:
    """Per-gene networks' FLOPs / one multi-output network's FLOPs, for `genes` outputs."""
    per_gene = genes * (backbone_flops + 2 * dim)
    multi = backbone_flops + 2 * dim * genes
    return per_gene / multi


def emo_cost(backbone_flops: int, dim: int, genes: int, *, images_per_s: float | None = None,
             images_per_network: float | None = None) -> dict:
    """The cost comparison with the paper, at this job's gene count and at the paper's.

    images_per_s (measured training throughput) and images_per_network (what one network was
    trained on) give the measured device-hours of this job's network; the paper-scale figures
    scale the paper's 300,000 GPU-hours by the FLOP ratio at 17,695 genes.
    """
    r_job = cost_ratio(backbone_flops, dim, genes)
    r_paper = cost_ratio(backbone_flops, dim, PAPER_GENES)
    out = {"backbone_gflops_per_image": backbone_flops / 1e9, "head_dim": dim, "genes": genes,
           "cost_ratio_per_gene_vs_one_network": r_job, "cost_ratio_at_paper_genes": r_paper,
           "paper_gpu_hours": PAPER_GPU_HOURS, "paper_gpu_hours_as_one_network": PAPER_GPU_HOURS / r_paper,
           "assumption": "each network (per-gene or multi-output) is trained on the same number of images; "
                         "cost counted as FLOPs of one forward pass (training scales both sides alike)"}
    if images_per_s and images_per_network:
        hours = images_per_network / images_per_s / 3600
        out.update(measured_images_per_s=images_per_s, images_per_network=images_per_network,
                   this_network_device_hours=hours, per_gene_device_hours=hours * r_job)
    return out
