"""The three aggregators as torch modules: gated attention (ABMIL; CLAM-SB with instance classifiers) and a
small TransMIL-style transformer; each maps a padded batch of bags to slide outputs, tile attention and scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hefeat.learn.mil.params import MilParams


def build_net(kind: str, d_in: int, n_out: int, p: MilParams, n_classes: int = 0):
    """The torch module of an aggregator: forward(X (B, T, d), M (B, T)) -> dict(out, attention, tile)."""
    import torch
    from torch import nn

    class Gated(nn.Module):
        def __init__(self, h: int):
            super().__init__()
            a = max(1, h // 2)
            self.V, self.U, self.w = nn.Linear(h, a), nn.Linear(h, a), nn.Linear(a, 1)

        def forward(self, H, M):
            s = self.w(torch.tanh(self.V(H)) * torch.sigmoid(self.U(H))).squeeze(-1)
            return torch.softmax(s.masked_fill(~M, float("-inf")), -1)

    class Standardise(nn.Module):
        """Tiles standardised by the training tiles' mean and std (buffers: saved with the weights)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.zeros(d_in))
            self.register_buffer("scale", torch.ones(d_in))

        def forward(self, X):
            return (X - self.shift) / self.scale

    class AttentionMIL(nn.Module):
        def __init__(self, n_inst: int):
            super().__init__()
            self.std = Standardise()
            self.embed = nn.Sequential(nn.Linear(d_in, p.hidden), nn.ReLU(), nn.Dropout(p.dropout))
            self.attn = Gated(p.hidden)
            self.head = nn.Linear(p.hidden, n_out)
            self.inst = nn.ModuleList([nn.Linear(p.hidden, 2) for _ in range(n_inst)])

        def forward(self, X, M):
            H = self.embed(self.std(X))
            A = self.attn(H, M)
            out = self.head((A.unsqueeze(-1) * H).sum(1))
            tile = None
            if not self.training:  # per-tile scores are outputs, not part of the loss
                tile = self.head(H) if not len(self.inst) else torch.stack([c(H)[..., 1] - c(H)[..., 0]
                                                                            for c in self.inst], -1)
            return {"out": out, "attention": A, "tile": tile, "H": H}

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            h = p.hidden
            self.n1, self.n2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.mha = nn.MultiheadAttention(h, p.heads, dropout=p.dropout, batch_first=True)
            self.ff = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Dropout(p.dropout), nn.Linear(2 * h, h))

        def forward(self, x, kpm, weights: bool):
            y = self.n1(x)
            a, w = self.mha(y, y, y, key_padding_mask=kpm, need_weights=weights, average_attn_weights=True)
            x = x + a
            return x + self.ff(self.n2(x)), w

    class TransMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = Standardise()
            self.embed = nn.Sequential(nn.Linear(d_in, p.hidden), nn.ReLU(), nn.Dropout(p.dropout))
            self.cls = nn.Parameter(torch.zeros(1, 1, p.hidden))
            nn.init.normal_(self.cls, std=0.02)
            self.blocks = nn.ModuleList([Block() for _ in range(p.layers)])
            self.norm = nn.LayerNorm(p.hidden)
            self.head = nn.Linear(p.hidden, n_out)

        def forward(self, X, M):
            H = self.embed(self.std(X))
            x = torch.cat([self.cls.expand(len(H), -1, -1), H], 1)
            kpm = torch.cat([torch.zeros(len(M), 1, dtype=torch.bool, device=M.device), ~M], 1)
            w = None
            for i, b in enumerate(self.blocks):
                x, w = b(x, kpm, i == len(self.blocks) - 1)
            A = w[:, 0, 1:]
            A = A / A.sum(1, keepdim=True).clamp_min(1e-12)  # the class token's share given to the tiles
            return {"out": self.head(self.norm(x[:, 0])), "attention": A, "tile": None, "H": H}

    if kind == "transmil":
        return TransMIL()
    n_inst = n_classes if kind == "clam" and getattr(p, "instance_loss", False) else 0
    return AttentionMIL(n_inst)
