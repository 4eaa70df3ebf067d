"""Training one fold of an aggregator (early stopping on a patient-grouped validation part, seeded tile
samples per epoch, CLAM's instance loss) and inference of a bag with the mean of fold models."""

from __future__ import annotations

import numpy as np

from hefeat.learn.mil.aggregators import build_net
from hefeat.learn.mil.data import Targets
from hefeat.learn.mil.params import MilParams
from hefeat.learn.mil.survival import _bins, cox_loss, nll_survival_loss, survival_risk

COX_MIN_BATCH = 16  # the Cox partial likelihood compares bags: a step needs several (with events)


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
    """Mean over nets of one bag's score(s), attention and per-tile scores (eval mode, no grad); with
    classification also the mean logits ("logits")."""
    import torch

    Xt = torch.from_numpy(X)[None]
    M = torch.ones(1, len(X), dtype=torch.bool)
    score, att, tile, logits = [], [], [], []
    with torch.no_grad():
        for net, mu, sd in nets:
            net.eval()
            r = net(Xt, M)
            out = r["out"]
            if task == "classification":
                score.append(torch.softmax(out, 1)[0].numpy())
                logits.append(out[0].numpy())
            elif task == "regression":
                score.append(out[0].numpy() * sd + mu)
            else:
                score.append(survival_risk(out, loss).numpy())
            att.append(r["attention"][0].numpy())
            if r["tile"] is not None:
                tile.append(r["tile"][0].numpy())
    sc = np.mean(score, 0)
    res = {"score": sc if task == "classification" else float(np.ravel(sc)[0]), "attention": np.mean(att, 0)}
    if logits:  # classification: the nets' mean logits (the fold scaling of fit_mil divides them)
        res["logits"] = np.mean(logits, 0)
    if tile:
        T = np.mean(tile, 0)
        if task == "classification" and T.shape[1] == 2 and nets[0][0].head.out_features == 2:
            T = T[:, 1:] - T[:, :1] if not len(nets[0][0].inst) else T[:, 1:]
        res["tile"] = T[:, 0] if T.shape[1] == 1 else T
    return res
