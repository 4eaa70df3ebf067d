"""Slide-level attention multiple-instance learning on stored tile embeddings: three aggregators, one pipeline.

- `abmil`: gated-attention MIL (Ilse, Tomczak & Welling, ICML 2018): tiles -> a hidden layer -> gated
  attention weights a_i (softmax over the bag) -> slide embedding sum_i a_i h_i -> head.
- `clam`: CLAM-SB-style single-branch attention (Lu et al., Nat Biomed Eng 2021): the same gated
  attention plus, with --instance-loss, per-class instance classifiers trained on the k most and k
  least attended tiles of each bag as pseudo-labelled positives and negatives (out-of-class branches
  too, for more than two classes); bag loss 1 - w, instance loss w.
- `transmil`: a small TransMIL-style transformer aggregator (Shao et al., NeurIPS 2021): a class token
  and pre-norm multi-head self-attention layers over the bag's tiles; the class token's attention in
  the last layer is the tile attention. (TransMIL's PPEG positional encoding and Nyström attention are
  left out: bags are capped by --max-tiles instead.)

Targets: a binary or multi-class column (clinical or slides table), a continuous column (regression),
or survival from --time-col/--event-col: discrete-time negative log-likelihood over quantile bins of
the training events (Chen et al.'s PORPOISE, Cancer Cell 2022) or the Cox partial likelihood (Breslow
ties). Bags are patients (all their labelled slides pooled) when every patient's slides share the
label, else slides (--level). Splits are patient-grouped (`hefeat.learn.splits.parse_split`), each fold
stops early on a patient-grouped validation part of its training patients; class weights balance
classes; every random choice derives from --seed. Metrics on the out-of-fold bags with patient
bootstrap CIs (AUC; C-index and time-dependent AUC; Pearson r), next to the same folds' baseline:
mean-pooled features + logistic / Cox / ridge regression.

Attention weights (and per-tile scores: the head applied to each tile's hidden vector, or CLAM's
instance logits) of each bag's held-out fold model are written as per-tile predictions, so heatmaps,
the explorer and SQL see them. `hefeat predict` scores new slides with the mean of the fold models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    param,
    register,
)
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.predictions import write_predictions

TASKS = ("classification", "regression", "survival")
SMALL_TEST = 10
COX_MIN_BATCH = 16  # the Cox partial likelihood compares bags: a step needs several (with events)


def _split_spec(v: str) -> str:
    kind, _, arg = v.partition(":")
    if kind not in ("patient-kfold", "holdout", "loo", "leave-one-patient-out"):
        raise HefeatError(f"--split must be patient-kfold:K, holdout:FILE or leave-one-patient-out, got {v!r}")
    if kind == "patient-kfold" and arg and not arg.isdigit():
        raise HefeatError(f"--split patient-kfold:K needs an integer K, got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class MilParams(Params):
    """Parameters shared by the attention-MIL methods (recorded with the model)."""

    extraction_id: str = param(help="Extraction whose tile embeddings form the bags (any encoder, fine-tuned ones "
                               "included: hefeat extract --encoder finetuned:<job>).",
                               flag="--extraction")
    task: str = param("classification", "What is learnt from --label (or from --time-col/--event-col).",
                      choices=TASKS)
    label: str | None = param(None, "Column of the clinical/slides table (classification, regression).")
    time_col: str = param("survival_months", "Follow-up time column (survival).")
    event_col: str = param("event", "Event indicator column, 1 = event (survival).")
    survival_loss: str = param("nll", "Survival loss: discrete-time NLL over quantile bins, or Cox.",
                               choices=("nll", "cox"))
    n_bins: int = param(4, "Quantile bins of the training event times (--survival-loss nll).")
    level: str = param("auto", "Bags per patient (slides pooled) or per slide; auto: patient when every "
                       "patient's slides share the label.", choices=("auto", "patient", "slide"))
    split: str = param("patient-kfold:5", "patient-kfold:K, holdout:FILE or leave-one-patient-out.",
                       parse=_split_spec, file=True)
    val_share: float = param(0.2, "Share of each fold's training patients for early stopping.")
    max_tiles: int = param(512, "Tiles per training bag: a random sample of this many each epoch.")
    eval_max_tiles: int = param(16384, "Tiles per bag at evaluation and prediction (a fixed sample beyond).")
    hidden: int = param(128, "Hidden units of the tile embedding.")
    dropout: float = param(0.25, "Dropout on the tile embedding.")
    epochs: int = param(40, "Training epochs at most.")
    patience: int = param(8, "Epochs without a better validation loss before stopping.")
    batch_size: int = param(1, "Bags per optimisation step (1 as in ABMIL and CLAM; larger batches pad bags; "
                         "Cox steps take at least 16).")
    lr: float = param(1e-3, "Adam learning rate.")
    weight_decay: float = param(1e-4, "Adam weight decay.")
    class_weights: bool = param(True, "Weight classes inversely to their training frequency.")
    baseline: bool = param(True, "Fit the mean-pooled baseline on the same folds.")
    n_boot: int = param(1000, "Patient bootstrap resamples of the confidence intervals.")
    ci_level: float = param(0.95, "Confidence level of the bootstrap intervals.")
    seed: int = param(0, "Seed of the folds, validation parts, tile samples, initialisation and bootstrap.")

    def validate(self) -> None:
        _split_spec(self.split)
        if self.task in ("classification", "regression") and not self.label:
            raise HefeatError(f"--task {self.task} needs --label (a clinical or slides column)")
        check_range("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--n-bins", self.n_bins, 2)
        check_range("--max-tiles", self.max_tiles, 1)
        check_range("--eval-max-tiles", self.eval_max_tiles, 1)
        check_range("--hidden", self.hidden, 2)
        check_range("--dropout", self.dropout, 0, 1, hi_open=True)
        check_range("--epochs", self.epochs, 1)
        check_range("--patience", self.patience, 1)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--lr", self.lr, 0, lo_open=True)
        check_range("--weight-decay", self.weight_decay, 0)
        check_range("--n-boot", self.n_boot, 10)
        check_range("--ci-level", self.ci_level, 0, 1, lo_open=True, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class AbmilParams(MilParams):
    """Parameters of `hefeat fit abmil`."""


@dataclass(frozen=True, kw_only=True)
class ClamParams(MilParams):
    """Parameters of `hefeat fit clam` (CLAM-SB)."""

    instance_loss: bool = param(False, "Add CLAM's instance-clustering loss (classification only).")
    instance_k: int = param(8, "Most/least attended tiles per bag pseudo-labelled by the instance loss.")
    instance_weight: float = param(0.3, "Weight of the instance loss (bag loss: 1 - weight).")

    def validate(self) -> None:
        super().validate()
        if self.instance_loss and self.task != "classification":
            raise HefeatError("--instance-loss needs --task classification (its pseudo-labels are classes)")
        check_range("--instance-k", self.instance_k, 1)
        check_range("--instance-weight", self.instance_weight, 0, 1, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class TransmilParams(MilParams):
    """Parameters of `hefeat fit transmil`."""

    layers: int = param(2, "Self-attention layers.")
    heads: int = param(4, "Attention heads (must divide --hidden).")

    def validate(self) -> None:
        super().validate()
        check_range("--layers", self.layers, 1)
        check_range("--heads", self.heads, 1)
        if self.hidden % self.heads:
            raise HefeatError(f"--heads ({self.heads}) must divide --hidden ({self.hidden})")


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Losses and targets
# ----------------------------------------------------------------------------------------------
def nll_survival_loss(logits, bins, events, eps: float = 1e-7):
    """Discrete-time survival NLL (PORPOISE): hazards sigmoid(logits); events die in their bin, others survive it."""
    import torch

    h = torch.sigmoid(logits).clamp(eps, 1 - eps)
    S = torch.cumprod(1 - h, 1)
    S_prev = torch.cat([torch.ones_like(S[:, :1]), S[:, :-1]], 1)
    b = bins.long().unsqueeze(1)
    died = -(torch.log(S_prev.gather(1, b)) + torch.log(h.gather(1, b))).squeeze(1)
    alive = -torch.log(S.gather(1, b).clamp_min(eps)).squeeze(1)
    return torch.where(events > 0, died, alive).mean()


def cox_loss(risk, times, events):
    """Negative Cox partial log-likelihood (Breslow ties) per event; 0 when the batch holds no event."""
    import torch

    order = torch.argsort(times, descending=True)
    r, e = risk[order], events[order]
    lse = torch.logcumsumexp(r, 0)
    n = e.sum()
    return -((r - lse) * e).sum() / n.clamp_min(1.0)


def survival_risk(out, loss: str):
    """Risk score (higher = earlier event): Cox's linear predictor, or minus the expected survival over bins."""
    import torch

    if loss == "cox":
        return out[:, 0]
    S = torch.cumprod(1 - torch.sigmoid(out), 1)
    return -S.sum(1)


@dataclass
class Targets:
    """Per-bag targets of one task: y (classes / values / bins), time and event (survival)."""

    task: str
    y: np.ndarray
    classes: list[str]
    time: np.ndarray | None = None
    event: np.ndarray | None = None


def _bag_table(store: Store, p: MilParams) -> tuple[pd.DataFrame, str]:
    """Labelled slides with features: slide_id, patient_id, site and target columns; and the bag level."""
    from hefeat.learn.data import clinical_by_slide, finished_slides

    clin = clinical_by_slide(store)
    cols = [p.time_col, p.event_col] if p.task == "survival" else [p.label]
    for c in cols:
        if c not in clin.columns:
            raise HefeatError(f"Column {c!r} is not in the clinical or slides table; have: "
                              f"{', '.join(sorted(map(str, clin.columns)))}")
    df = clin[list(dict.fromkeys(["slide_id", "patient_id", "site", *cols]))].dropna(subset=cols)
    df = df[df["slide_id"].isin(set(finished_slides(store, p.extraction_id)))].sort_values("slide_id")
    if df.empty:
        raise NotEstimable(f"No slide with features in extraction {p.extraction_id} has a value of {', '.join(cols)}")
    df = df.reset_index(drop=True)
    same = (df.groupby("patient_id")[cols].nunique() <= 1).all(axis=None)
    level = p.level if p.level != "auto" else ("patient" if same else "slide")
    if level == "patient" and not same:
        raise HefeatError(f"Some patients' slides disagree on {', '.join(cols)}: a patient bag needs one value; "
                          "use --level slide")
    return df, level


def _targets(df: pd.DataFrame, p: MilParams) -> Targets:
    if p.task == "classification":
        raw = df[p.label]
        classes = sorted(raw.astype(str).unique())
        if len(classes) < 2:
            raise NotEstimable(f"Label {p.label!r} has one class only ({classes[0]}) among slides with features")
        return Targets("classification", raw.astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(), classes)
    if p.task == "regression":
        y = pd.to_numeric(df[p.label], errors="coerce").to_numpy(float)
        if not np.isfinite(y).all():
            raise HefeatError(f"--task regression needs a numeric {p.label!r}; it holds non-numbers")
        if np.ptp(y) == 0:
            raise NotEstimable(f"{p.label!r} is constant: nothing to regress")
        return Targets("regression", y, [])
    t = pd.to_numeric(df[p.time_col], errors="coerce").to_numpy(float)
    e = pd.to_numeric(df[p.event_col], errors="coerce").to_numpy(float)
    if not (np.isfinite(t).all() and np.isin(e, (0, 1)).all()):
        raise HefeatError(f"Survival needs numeric {p.time_col!r} and a 0/1 {p.event_col!r}")
    if e.sum() == 0:
        raise NotEstimable(f"{p.event_col!r} holds no event among {len(e)} bags: survival cannot be estimated; "
                           "use a column with events (1 = event)")
    return Targets("survival", np.zeros(len(t), np.int64), [], t, e)


def _bins(t_train: np.ndarray, e_train: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner cut points of the quantile bins of the training event times (PORPOISE)."""
    ev = t_train[e_train > 0]
    q = np.quantile(ev, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(ev) else np.array([])
    return np.unique(q)


# ----------------------------------------------------------------------------------------------
# Training one fold
# ----------------------------------------------------------------------------------------------
class _Fold:
    """One fold's net, its target encoding and its training loop."""

    def __init__(self, kind: str, p: MilParams, tg: Targets, d_in: int, train: np.ndarray, seed: int,
                 moments: tuple[np.ndarray, np.ndarray]):
        import torch

        self.kind, self.p, self.tg = kind, p, tg
        self.cuts = np.array([])
        self.mu, self.sd = 0.0, 1.0
        if tg.task == "classification":
            n_out = len(tg.classes)
            counts = np.bincount(tg.y[train], minlength=n_out).astype(float)
            w = counts.sum() / (n_out * np.maximum(counts, 1)) if p.class_weights else np.ones(n_out)
            self.weight = torch.tensor(w, dtype=torch.float32)
        elif tg.task == "regression":
            n_out = 1
            self.mu, self.sd = float(tg.y[train].mean()), float(tg.y[train].std() or 1.0)
        else:
            self.cuts = _bins(tg.time[train], tg.event[train], p.n_bins)
            n_out = 1 if p.survival_loss == "cox" else len(self.cuts) + 1
        torch.manual_seed(seed)
        self.net = build_net(kind, d_in, n_out, p, len(tg.classes))
        mean, sd = moments
        self.net.std.shift.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.net.std.scale.copy_(torch.as_tensor(np.where(sd > 1e-6, sd, 1.0), dtype=torch.float32))

    def batch_targets(self, idx: np.ndarray) -> dict:
        import torch

        tg = self.tg
        if tg.task == "classification":
            return {"y": torch.as_tensor(tg.y[idx], dtype=torch.long)}
        if tg.task == "regression":
            return {"y": torch.as_tensor((tg.y[idx] - self.mu) / self.sd, dtype=torch.float32)}
        return {"t": torch.as_tensor(tg.time[idx], dtype=torch.float32),
                "e": torch.as_tensor(tg.event[idx], dtype=torch.float32),
                "bin": torch.as_tensor(np.searchsorted(self.cuts, tg.time[idx], side="left"), dtype=torch.long)}

    def loss(self, r: dict, t: dict, M):
        import torch.nn.functional as F

        tg, p = self.tg, self.p
        out = r["out"]
        if tg.task == "classification":
            loss = F.cross_entropy(out, t["y"], weight=self.weight)
            if self.kind == "clam" and getattr(p, "instance_loss", False):
                loss = (1 - p.instance_weight) * loss + p.instance_weight * self._instance_loss(r, t["y"], M)
            return loss
        if tg.task == "regression":
            return F.mse_loss(out[:, 0], t["y"])
        if p.survival_loss == "cox":
            return cox_loss(out[:, 0], t["t"], t["e"])
        return nll_survival_loss(out, t["bin"], t["e"])

    def _instance_loss(self, r: dict, y, M):
        """CLAM's instance clustering: top-k attended tiles positive, bottom-k negative for the bag's class
        branch; with more than two classes the other branches see the top-k as negatives (Lu et al. 2021)."""
        import torch
        import torch.nn.functional as F

        A, H = r["attention"], r["H"]
        losses = []
        n_cls = len(self.tg.classes)
        for b in range(len(A)):
            n = int(M[b].sum())
            k = min(self.p.instance_k, max(1, n // 2))
            a = A[b, :n]
            top, bottom = torch.topk(a, k).indices, torch.topk(-a, k).indices
            for c in range(n_cls):
                clf = self.net.inst[c]
                if c == int(y[b]):
                    x = torch.cat([H[b, top], H[b, bottom]])
                    lab = torch.cat([torch.ones(k), torch.zeros(k)]).long()
                elif n_cls > 2:
                    x, lab = H[b, top], torch.zeros(k).long()
                else:
                    continue
                losses.append(F.cross_entropy(clf(x), lab))
        return torch.stack(losses).mean()

    def fit(self, reader, train: np.ndarray, val: np.ndarray, fold_seed: int, eval_rows) -> dict:
        """Train with early stopping on the validation bags' loss; keeps the best epoch's weights."""
        import copy

        import torch

        from hefeat.learn.bags import pad, tile_sample
        from hefeat.store import faults

        p = self.p
        opt = torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        best, best_state, best_epoch, history = np.inf, copy.deepcopy(self.net.state_dict()), 0, []
        n_tiles = reader.bags.n_tiles
        for epoch in range(p.epochs):
            faults.point("mil.epoch")
            rng = np.random.default_rng([fold_seed, epoch])
            order = rng.permutation(train)
            bs = max(p.batch_size, COX_MIN_BATCH) if self.tg.task == "survival" and p.survival_loss == "cox" else p.batch_size
            batches = [order[i:i + bs] for i in range(0, len(order), bs)]
            samples = {int(i): tile_sample(int(n_tiles[i]), p.max_tiles, rng) for i in order}
            self.net.train()
            total = 0.0
            for idx, arrays in reader.batches(batches, samples.__getitem__):
                X, M = pad(arrays, reader.bags.dim)
                X, M = torch.from_numpy(X), torch.from_numpy(M)
                t = self.batch_targets(np.asarray(idx))
                if self.tg.task == "survival" and p.survival_loss == "cox" and float(t["e"].sum()) == 0:
                    continue
                loss = self.loss(self.net(X, M), t, M)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            vl = self.val_loss(reader, val if len(val) else train, eval_rows)
            history.append({"epoch": epoch + 1, "train_loss": total / max(len(train), 1), "val_loss": vl})
            if vl < best - 1e-6:
                best, best_state, best_epoch = vl, copy.deepcopy(self.net.state_dict()), epoch + 1
            elif epoch + 1 - best_epoch >= p.patience:
                break
        self.net.load_state_dict(best_state)
        return {"best_epoch": best_epoch, "best_val_loss": float(best), "history": history}

    def val_loss(self, reader, idx: np.ndarray, eval_rows) -> float:
        import torch

        from hefeat.learn.bags import pad

        self.net.eval()
        with torch.no_grad():
            outs = [self.net(*map(torch.from_numpy, pad([reader.read(int(i), eval_rows(int(i)))], reader.bags.dim)))["out"]
                    for i in idx]
            out = torch.cat(outs)
            M = torch.ones(len(idx), 1, dtype=torch.bool)
            t = self.batch_targets(np.asarray(idx))
            if self.tg.task == "classification":
                import torch.nn.functional as F

                return float(F.cross_entropy(out, t["y"], weight=self.weight))
            return float(self.loss({"out": out}, t, M))


def _infer(nets: list, X: np.ndarray, task: str, loss: str) -> dict:
    """Mean over nets of one bag's score(s), attention and per-tile scores (eval mode, no grad)."""
    import torch

    Xt = torch.from_numpy(X)[None]
    M = torch.ones(1, len(X), dtype=torch.bool)
    score, att, tile = [], [], []
    with torch.no_grad():
        for net, mu, sd in nets:
            net.eval()
            r = net(Xt, M)
            out = r["out"]
            if task == "classification":
                score.append(torch.softmax(out, 1)[0].numpy())
            elif task == "regression":
                score.append(out[0].numpy() * sd + mu)
            else:
                score.append(survival_risk(out, loss).numpy())
            att.append(r["attention"][0].numpy())
            if r["tile"] is not None:
                tile.append(r["tile"][0].numpy())
    sc = np.mean(score, 0)
    res = {"score": sc if task == "classification" else float(np.ravel(sc)[0]), "attention": np.mean(att, 0)}
    if tile:
        T = np.mean(tile, 0)
        if task == "classification" and T.shape[1] == 2 and nets[0][0].head.out_features == 2:
            T = T[:, 1:] - T[:, :1] if not len(nets[0][0].inst) else T[:, 1:]
        res["tile"] = T[:, 0] if T.shape[1] == 1 else T
    return res


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def time_dependent_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, at: float) -> float:
    """Cumulative/dynamic AUC at `at`: P(risk of an event by `at` > risk of a subject event-free past `at`).

    Unweighted (no inverse-probability-of-censoring weights); NaN when either group is empty.
    """
    case = (time <= at) & (event > 0)
    ctrl = time > at
    if not case.any() or not ctrl.any():
        return float("nan")
    a, b = risk[case][:, None], risk[ctrl][None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


def binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of 0/1 labels by the rank-sum (Mann-Whitney) formula, ties counted half; NaN for one class."""
    from scipy.stats import rankdata

    y = np.asarray(y)
    n1 = int((y == 1).sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _c_index(t, e, risk) -> float:
    from lifelines.utils import concordance_index

    if e.sum() == 0:
        return float("nan")
    return float(concordance_index(t, -risk, e))


def _metric_rows(tg: Targets, idx: np.ndarray, score: np.ndarray, groups: np.ndarray, p: MilParams,
                 model: str) -> list[dict]:
    """Metric rows (metric, value, ci_low, ci_high, n) of out-of-fold scores, patient bootstrap CIs."""
    from hefeat.learn.stats import bootstrap_ci

    g = groups[idx]
    rows = []

    def add(name, fn):
        v = fn(np.arange(len(idx)))
        lo, hi = bootstrap_ci(fn, len(idx), n_boot=p.n_boot, seed=p.seed, groups=g, level=p.ci_level)
        rows.append({"model": model, "metric": name, "value": v, "ci_low": lo, "ci_high": hi, "n": int(len(idx)),
                     "n_patients": int(len(np.unique(g)))})

    if tg.task == "classification":
        y = tg.y[idx]
        K = len(tg.classes)
        if K == 2:
            add("auc", lambda j: binary_auc(y[j], score[j, 1]))
        else:
            def mauc(j):  # macro one-vs-rest AUC (roc_auc_score's multi_class="ovr"), by ranks
                if len(np.unique(y[j])) < K:
                    return np.nan
                return float(np.mean([binary_auc((y[j] == c).astype(int), score[j, c]) for c in range(K)]))
            add("auc", mauc)
        add("accuracy", lambda j: float((score[j].argmax(1) == y[j]).mean()))
    elif tg.task == "regression":
        y = tg.y[idx]
        s = score.reshape(-1)

        def r(j):
            return float(np.corrcoef(s[j], y[j])[0, 1]) if np.std(s[j]) > 0 and np.std(y[j]) > 0 else np.nan
        add("pearson_r", r)
        add("r2", lambda j: float(1 - ((y[j] - s[j]) ** 2).sum() / max(((y[j] - y[j].mean()) ** 2).sum(), 1e-12)))
    else:
        t, e, s = tg.time[idx], tg.event[idx], score.reshape(-1)
        add("c_index", lambda j: _c_index(t[j], e[j], s[j]))
        ev = t[e > 0]
        taus = np.quantile(ev, [0.25, 0.5, 0.75]) if len(ev) else []
        for q, tau in zip((25, 50, 75), taus, strict=False):
            add(f"td_auc_q{q}", lambda j, tau=tau: time_dependent_auc(t[j], e[j], s[j], tau))
    return rows


# ----------------------------------------------------------------------------------------------
# Baseline: mean-pooled features, same folds
# ----------------------------------------------------------------------------------------------
def _aggregates(store: Store, extraction_id: str):
    from hefeat.store.features import slide_aggregates

    a = slide_aggregates(store, extraction_id)
    return a, {s: i for i, s in enumerate(a.slide_ids)}


def _tile_moments(agg, slides: list[list[str]], bags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every tile of the given bags, from the per-slide aggregates (no tile read)."""
    a, pos = agg
    k = [pos[s] for b in bags for s in slides[int(b)]]
    n = a.n[k].astype(float)[:, None]
    mean = (a.mean[k] * n).sum(0) / n.sum()
    var = ((a.std[k] ** 2 + a.mean[k] ** 2) * n).sum(0) / n.sum() - mean**2
    return mean, np.sqrt(np.maximum(var, 0))


def _linear_cox(Xtr, t, e, Xte, l2: float = 1.0) -> np.ndarray:
    """Ridge-penalised linear Cox model (L-BFGS on the Breslow partial likelihood); risks of Xte."""
    import torch

    X = torch.as_tensor(Xtr, dtype=torch.float64)
    beta = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    tt, ee = torch.as_tensor(t), torch.as_tensor(e, dtype=torch.float64)
    opt = torch.optim.LBFGS([beta], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_loss(X @ beta, tt, ee) + l2 * (beta ** 2).sum() / len(X)
        loss.backward()
        return loss

    opt.step(closure)
    return (torch.as_tensor(Xte, dtype=torch.float64) @ beta).detach().numpy()


def mean_pooled(store: Store, extraction_id: str, slides: list[list[str]]) -> np.ndarray:
    """Tile-weighted mean embedding per bag, from the aggregates written at extraction."""
    from hefeat.store.features import slide_aggregates

    a = slide_aggregates(store, extraction_id)
    pos = {s: i for i, s in enumerate(a.slide_ids)}
    out = np.empty((len(slides), a.mean.shape[1]))
    for b, ss in enumerate(slides):
        k = [pos[s] for s in ss]
        out[b] = (a.mean[k] * a.n[k, None]).sum(0) / max(a.n[k].sum(), 1)
    return out


def _baseline_scores(Xm: np.ndarray, tg: Targets, folds, p: MilParams) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(Xm)
    K = len(tg.classes)
    score = np.full((n, K) if tg.task == "classification" else (n,), np.nan)
    for f in folds:
        sc = StandardScaler().fit(Xm[f.train])
        A, B = sc.transform(Xm[f.train]), sc.transform(Xm[f.test])
        if tg.task == "classification":
            clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced" if p.class_weights else None)
            clf.fit(A, tg.y[f.train])
            P = np.zeros((len(f.test), K))
            P[:, clf.classes_] = clf.predict_proba(B)
            score[f.test] = P
        elif tg.task == "regression":
            score[f.test] = make_pipeline(RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(A, tg.y[f.train]).predict(B)
        else:
            score[f.test] = _linear_cox(A, tg.time[f.train], tg.event[f.train], B)
    return score


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------
def _state_arrays(k: int, net) -> dict:
    return {f"fold{k}:{name}": v.detach().cpu().numpy() for name, v in net.state_dict().items()}


def _load_nets(kind: str, meta: dict, p: MilParams) -> list:
    """The fold nets of a stored model with their regression scaling: [(net, mu, sd)]."""
    import torch

    s = meta["summary"]
    A = meta["arrays"]
    nets = []
    for k in range(int(s["n_folds"])):
        net = build_net(kind, int(s["dim"]), int(s["n_out"][k]), p, len(s.get("classes") or []))
        state = {name.split(":", 1)[1]: torch.from_numpy(v) for name, v in A.items() if name.startswith(f"fold{k}:")}
        net.load_state_dict(state)
        nets.append((net, float(s["scale"][k][0]), float(s["scale"][k][1])))
    return nets


def fit_mil(kind: str, store: Store, p: MilParams, model_id: str) -> FitResult:
    """Patient-grouped cross-validated attention MIL with early stopping, the mean-pool baseline, tile attention."""
    from hefeat.learn.bags import BagReader, make_bags, tile_sample
    from hefeat.learn.nets import derive_seed
    from hefeat.learn.splits import assert_disjoint, group_holdout, parse_split
    from hefeat.learn.threads import training_threads

    df, level = _bag_table(store, p)
    key = "patient_id" if level == "patient" else "slide_id"
    first = df.drop_duplicates(key).reset_index(drop=True)
    slides = [g["slide_id"].tolist() for _, g in df.groupby(key, sort=False)]
    tg = _targets(first, p)
    bags = make_bags(store, p.extraction_id, first[key].to_numpy(), first["patient_id"].to_numpy(), slides)
    patients = bags.patients
    folds = parse_split(p.split, bags.ids, patients, seed=p.seed)
    reader = BagReader(bags)

    def eval_rows(i: int) -> np.ndarray:
        return tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i]))

    n = len(bags)
    K = len(tg.classes)
    oof = np.full((n, K) if tg.task == "classification" else (n,), np.nan)
    fold_of = np.full(n, -1)
    tiles_out: dict[int, dict] = {}
    arrays, fold_rows, n_out, scale, notes = {}, [], [], [], []
    d = bags.dim
    agg = _aggregates(store, p.extraction_id)
    flops = 6.0 * p.batch_size * p.max_tiles * d * p.hidden
    with training_threads(flops):
        for k, f in enumerate(folds):
            inner = group_holdout(patients[f.train], p.val_share, seed=derive_seed(p.seed, k, 1))
            tr, va = f.train[inner.train], f.train[inner.test]
            assert_disjoint(patients, tr, va, f.test)
            if tg.task == "classification":
                have = np.unique(tg.y[tr])
                if len(have) < K:
                    miss = [tg.classes[c] for c in range(K) if c not in have]
                    raise NotEstimable(f"{f.name}: its training patients hold no bag of class {', '.join(miss)} of "
                                       f"{p.label}; use fewer folds (--split patient-kfold:3), another --seed or more "
                                       "slides")
            if tg.task == "survival" and tg.event[tr].sum() == 0:
                raise NotEstimable(f"{f.name}: its training patients have no event in {p.event_col!r}; use fewer folds "
                                   "or more patients with events")
            fm = _Fold(kind, p, tg, d, tr, derive_seed(p.seed, k, 2), _tile_moments(agg, bags.slides, tr))
            info = fm.fit(reader, tr, va, derive_seed(p.seed, k, 3), eval_rows)
            nets = [(fm.net, fm.mu, fm.sd)]
            for i in f.test:
                r = _infer(nets, reader.read(int(i), eval_rows(int(i))), tg.task, p.survival_loss)
                oof[i] = r["score"]
                fold_of[i] = k
                tiles_out[int(i)] = r
            arrays.update(_state_arrays(k, fm.net))
            n_out.append(int(fm.net.head.out_features))
            scale.append([fm.mu, fm.sd])
            fold_rows.append({"fold": f.name, "n_train": len(tr), "n_validation": len(va), "n_test": len(f.test),
                              "best_epoch": info["best_epoch"], "best_val_loss": info["best_val_loss"],
                              "epochs_run": len(info["history"]),
                              "cuts": ",".join(f"{c:g}" for c in fm.cuts)})
            for h in info["history"]:
                fold_rows.append({"fold": f.name, **h, "history": True})
    tested = np.flatnonzero(fold_of >= 0)
    metrics = _metric_rows(tg, tested, oof[tested], patients, p, kind)
    base = None
    if p.baseline:
        Xm = mean_pooled(store, p.extraction_id, bags.slides)
        base = _baseline_scores(Xm, tg, folds, p)
        metrics += _metric_rows(tg, tested, base[tested], patients, p, "mean-pool baseline")
    metrics = pd.DataFrame(metrics)
    main_metric = {"classification": "auc", "regression": "pearson_r", "survival": "c_index"}[tg.task]
    mine = metrics[(metrics["model"] == kind) & (metrics["metric"] == main_metric)].iloc[0]
    if not np.isfinite(mine["value"]):
        raise NotEstimable(f"The held-out bags give no {main_metric} ({len(tested)} bags; e.g. one class only or no "
                           "event); use fewer folds or more slides")
    summary = {"extraction_id": p.extraction_id, "aggregator": kind, "task": tg.task,
               "target": p.label if tg.task != "survival" else f"{p.time_col}/{p.event_col}",
               "level": level, "n_bags": n, "n_patients": int(len(np.unique(patients))),
               "n_tested": int(len(tested)), "split": f"{p.split} seed={p.seed}", "n_folds": len(folds),
               "metric": main_metric, "value": float(mine["value"]), "ci_low": float(mine["ci_low"]),
               "ci_high": float(mine["ci_high"]), "ci_level": p.ci_level, "dim": d, "n_out": n_out, "scale": scale,
               "classes": tg.classes,
               "tiles": f"training: random {p.max_tiles} tiles per bag per epoch (seeded by seed, fold, epoch); "
                        f"evaluation: all tiles up to {p.eval_max_tiles} (fixed seeded sample beyond)",
               "n_tiles_total": int(bags.n_tiles.sum()), "max_bag_tiles": int(bags.n_tiles.max())}
    if base is not None:
        b = metrics[(metrics["model"] == "mean-pool baseline") & (metrics["metric"] == main_metric)].iloc[0]
        summary.update({"baseline_value": float(b["value"]), "baseline_ci_low": float(b["ci_low"]),
                        "baseline_ci_high": float(b["ci_high"])})
    if len(np.unique(patients[tested])) < SMALL_TEST:
        notes.append(f"{main_metric} from {len(np.unique(patients[tested]))} held-out patients: the bootstrap CI of so "
                     "few patients is unreliable; add patients")
    scores = _score_table(bags, tg, oof, base, fold_of, [f.name for f in folds])
    _write_tiles(store, model_id, p, bags, reader, tiles_out, fold_of, [f.name for f in folds], eval_rows)
    return FitResult(summary=summary, arrays=arrays, extraction_id=p.extraction_id, notes=notes,
                     tables={"metrics": metrics, "patient_scores": scores, "folds": pd.DataFrame(fold_rows)})


def _score_table(bags, tg: Targets, oof, base, fold_of, fold_names) -> pd.DataFrame:
    df = pd.DataFrame({"bag_id": bags.ids, "patient_id": bags.patients, "slides": [",".join(s) for s in bags.slides],
                       "n_tiles": bags.n_tiles, "fold": [fold_names[k] if k >= 0 else None for k in fold_of]})
    if tg.task == "classification":
        df["y"] = [tg.classes[c] for c in tg.y]
        for c, name in enumerate(tg.classes):
            df[f"p_{name}"] = oof[:, c]
            if base is not None:
                df[f"baseline_p_{name}"] = base[:, c]
    else:
        if tg.task == "regression":
            df["y"] = tg.y
        else:
            df["time"], df["event"] = tg.time, tg.event
        df["score"] = oof
        if base is not None:
            df["baseline_score"] = base
    return df


def _write_tiles(store: Store, mid: str, p: MilParams, bags, reader, tiles_out: dict, fold_of, fold_names,
                 eval_rows) -> None:
    """Per-tile predictions (attention, its bag-size-scaled form, tile score) of each bag's held-out model."""
    from hefeat.store.features import read_slide_coords

    with write_predictions(store, mid) as write_pred:
        for i, r in tiles_out.items():
            rows = eval_rows(i)
            files = bags.files[i]
            att = np.full(int(bags.n_tiles[i]), np.nan)
            att[rows] = r["attention"]
            tile = None
            if "tile" in r and r["tile"].ndim == 1:
                tile = np.full(len(att), np.nan)
                tile[rows] = r["tile"]
            start = 0
            for f in files:
                xy = read_slide_coords(f)
                sl = slice(start, start + f.n)
                df = pd.DataFrame({"model_id": mid, "slide_id": f.slide_id, "tile_id": np.arange(f.n, dtype=np.int64),
                                   "x": xy[:, 0], "y": xy[:, 1], "attention": att[sl],
                                   "attention_scaled": att[sl] * len(rows)})
                if tile is not None:
                    df["tile_score"] = tile[sl]
                df["bag_id"] = bags.ids[i]
                df["fold"] = fold_names[fold_of[i]]
                write_pred(f.slide_id, df)
                start += f.n


# ----------------------------------------------------------------------------------------------
# Predict, headline, registration
# ----------------------------------------------------------------------------------------------
def predict_mil(kind: str, store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Score slides (default: every finished slide of the model's extraction) with the mean of the fold models.

    Each slide is its own bag here; its tiles' attention and scores are written as its predictions,
    and the slide scores to models/<id>/slide_predictions.parquet.
    """
    from hefeat.learn.bags import make_bags, tile_sample
    from hefeat.learn.data import finished_slides
    from hefeat.learn.models import load_model
    from hefeat.learn.registry import make_params
    from hefeat.store.tables import write_parquet

    meta = load_model(store, mid)
    cls = {"abmil": AbmilParams, "clam": ClamParams, "transmil": TransmilParams}[kind]
    p = make_params(cls, meta["params"])
    s = meta["summary"]
    nets = _load_nets(kind, meta, p)
    eid = meta["extraction_id"]
    sids = list(slides) if slides else finished_slides(store, eid)
    bags = make_bags(store, eid, np.array(sids), np.array(sids), [[x] for x in sids])
    from hefeat.learn.bags import BagReader

    reader = BagReader(bags, cache_bytes=0)
    out_rows, tiles_out = [], {}
    for i, sid in enumerate(sids):
        rows = tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i]))
        r = _infer(nets, reader.read(i, rows), s["task"], p.survival_loss)
        tiles_out[i] = r
        row = {"slide_id": sid, "n_tiles": int(bags.n_tiles[i])}
        if s["task"] == "classification":
            row.update({f"p_{c}": float(v) for c, v in zip(s["classes"], r["score"], strict=True)})
        else:
            row["score"] = float(np.ravel(r["score"])[0])
        out_rows.append(row)
    _write_tiles(store, mid, p, bags, reader, tiles_out, np.zeros(len(sids), int), ["ensemble"],
                 lambda i: tile_sample(int(bags.n_tiles[i]), p.eval_max_tiles, np.random.default_rng([p.seed, i])))
    write_parquet(pd.DataFrame(out_rows), layout.model_table_path(store.root, mid, "slide_predictions"))
    return {"model_id": mid, "slides": len(sids), "tiles": int(bags.n_tiles.sum()),
            "slide_value": f"mean of {s['n_folds']} fold models; tile attention per slide"}


def headline(s: dict) -> str:
    """The main held-out metric with its CI, next to the mean-pool baseline on the same folds."""
    lvl = f"{s.get('ci_level', 0.95):.0%}"
    txt = (f"{s['target']} ({s['task']}, {s['aggregator']}): held-out {s['metric']} {s['value']:.3f} "
           f"({lvl} CI {s['ci_low']:.3f}-{s['ci_high']:.3f}) on {s['n_tested']} {s['level']} bags")
    if "baseline_value" in s:
        txt += f"; mean-pool baseline {s['baseline_value']:.3f} ({s['baseline_ci_low']:.3f}-{s['baseline_ci_high']:.3f})"
    return txt


def _units(params: dict, col: str) -> str:
    return {"attention": "attention weight (share of the bag)", "attention_scaled": "attention x tiles in bag (1 = uniform)",
            "tile_score": "per-tile head output (logit / risk / value)"}.get(col, "model output")


def _plots(store: Store, mid: str, out: Path) -> list[Path]:
    return []


_EX = "hefeat fit {n} --extraction e1234 --label focal_status --split patient-kfold:5"
for _kind, _cls, _prefix, _summary in (
    ("abmil", AbmilParams, "abm-", "Gated-attention MIL (Ilse et al. 2018): slide/patient labels, survival, regression."),
    ("clam", ClamParams, "clm-", "CLAM-SB single-branch attention MIL with optional instance clustering (Lu et al. 2021)."),
    ("transmil", TransmilParams, "tml-", "Small TransMIL-style transformer aggregator over tiles (Shao et al. 2021)."),
):
    register(Method(
        name=_kind, prefix=_prefix, params=_cls,
        fit=(lambda k: lambda store, p, mid: fit_mil(k, store, p, mid))(_kind),
        predict=(lambda k: lambda store, mid, *, slides=None, top=20: predict_mil(k, store, mid, slides=slides, top=top))(_kind),
        headline=headline, plots=_plots, units=_units, summary=_summary, example=_EX.format(n=_kind),
    ))
