"""Small torch networks of stage 2 as scikit-learn estimators (BaseEstimator: get_params, clone).

- `He2rnaRegressor`: HE2RNA's per-tile MLP (1x1 convolutions) with random top-k pooling
  (Schmauch et al., Nat Commun 2020); fit on bags of (super-)tiles, predict = k-averaged top-k.
- `SpotMLP`: a one-hidden-layer head for spot expression (ST-Net's linear head on frozen features,
  with a hidden layer), output bias = mean expression.
- `ExpressionRepresentation` / `AutoencoderCode`: the 256-d sigmoid code of an expression MLP or of
  an autoencoder with the same bottleneck (HE2RNA's transfer experiment).

Every estimator is seeded by `random_state`, records `history_` (loss per epoch, for learning
curves) and trains under `training_threads(flops_per_step)` (one thread policy for all of stage 2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin

from hefeat.errors import HefeatError

SUPERTILE_KS = (1, 2, 5, 10, 20, 50, 100)
ALL_TILE_KS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def derive_seed(seed: int, *path: int) -> int:
    """A seed derived from `seed` for one role (fold, inner split, null model ...): independent streams."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# HE2RNA: bags, top-k pooling, the per-tile network
# ----------------------------------------------------------------------------------------------
def pad_bags(bags: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length bags (t_i, d) into (b, T, d) with a boolean mask (b, T)."""
    T = max(len(b) for b in bags)
    d = bags[0].shape[1]
    X = np.zeros((len(bags), T, d), np.float32)
    M = np.zeros((len(bags), T), bool)
    for i, b in enumerate(bags):
        X[i, :len(b)] = b
        M[i, :len(b)] = True
    return X, M


def topk_mean(scores, mask, k: int):
    """Mean of each slide's k highest tile scores per gene; scores (B, G, T), mask (B, T) -> (B, G).

    Padded tiles are -inf before the top-k so they never displace a real tile (even a negative one);
    a slide with fewer than k real tiles averages all of them.
    """
    import torch

    B, G, T = scores.shape
    kk = min(k, T)
    s = scores.masked_fill(~mask[:, None, :], float("-inf"))
    top = s.topk(kk, dim=2).values
    k_eff = mask.sum(1).clamp(max=kk).clamp(min=1)
    keep = torch.arange(kk, device=scores.device)[None, :] < k_eff[:, None]
    top = torch.where(keep[:, None, :], top, torch.zeros((), dtype=top.dtype, device=top.device))
    return top.sum(2) / k_eff[:, None].to(top.dtype)


def make_net(d_in: int, n_genes: int, hidden, dropout: float, bias_init: np.ndarray | None = None,
             feat_mean: np.ndarray | None = None, feat_std: np.ndarray | None = None):
    """The per-tile MLP as 1x1 convolutions: (B, d, T) -> (B, G, T); inputs standardised first."""
    import torch
    from torch import nn

    norm = nn.Conv1d(d_in, d_in, 1, groups=d_in)  # fixed per-feature (x - mean) / std, saved with the net
    with torch.no_grad():
        m = torch.zeros(d_in) if feat_mean is None else torch.as_tensor(feat_mean, dtype=torch.float32)
        sd = torch.ones(d_in) if feat_std is None else torch.as_tensor(feat_std, dtype=torch.float32)
        norm.weight.copy_((1 / sd).view(d_in, 1, 1))
        norm.bias.copy_(-m / sd)
    norm.requires_grad_(False)
    layers, d = [norm], d_in
    for h in hidden:
        layers += [nn.Conv1d(d, h, 1), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    last = nn.Conv1d(d, n_genes, 1)
    if bias_init is not None:
        with torch.no_grad():
            last.bias.copy_(torch.as_tensor(bias_init, dtype=torch.float32))
    layers.append(last)
    return nn.Sequential(*layers)


def predict_bags(net, X: np.ndarray, M: np.ndarray, ks, *, batch: int = 64) -> np.ndarray:
    """Inference: slide predictions averaged over every k in `ks`; (b, G)."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            x = torch.from_numpy(X[i:i + batch]).transpose(1, 2)
            m = torch.from_numpy(M[i:i + batch])
            s = net(x)
            out.append(torch.stack([topk_mean(s, m, k) for k in ks]).mean(0).numpy())
    return np.concatenate(out)


class He2rnaRegressor(RegressorMixin, BaseEstimator):
    """HE2RNA's per-tile MLP trained with random-k top-k pooling and early stopping.

    fit(bags, Y, groups): bags is a list of (t_i, d) arrays (super-tiles or tiles) and Y (n, G);
    `val_share` of the groups (patients) is held out of training for early stopping, drawn with a
    seed derived from `random_state`. epochs=0 gives the untrained network of the same
    architecture (standardisation and output bias fitted): HE2RNA's null model.
    """

    def __init__(self, hidden=(256,), *, dropout: float = 0.25, ks=SUPERTILE_KS, epochs: int = 100,
                 patience: int = 10, lr: float = 1e-3, batch_size: int = 16, weight_decay: float = 1e-4,
                 val_share: float = 0.2, random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.ks = ks
        self.epochs = epochs
        self.patience = patience
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.val_share = val_share
        self.random_state = random_state

    def fit(self, bags: list[np.ndarray], Y: np.ndarray, groups: np.ndarray | None = None) -> He2rnaRegressor:
        """Train on bags (list of (t_i, d)) and targets Y of shape (n, G); returns self."""
        from hefeat.learn.splits import group_holdout
        from hefeat.learn.threads import training_threads

        Y = np.asarray(Y, np.float32)
        n = len(bags)
        groups = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
        X, M = pad_bags(bags)
        if self.epochs > 0 and len(np.unique(groups)) >= 2:
            inner = group_holdout(groups, self.val_share, seed=derive_seed(self.random_state, 1))
            tr, va = inner.train, inner.test
        else:
            tr, va = np.arange(n), np.arange(0)
        width = sum(a * b for a, b in zip((X.shape[2], *self.hidden), (*self.hidden, Y.shape[1]), strict=True))
        with training_threads(flops_per_step=6.0 * min(self.batch_size, n) * X.shape[1] * width):
            self.net_, self.history_ = _train_he2rna(self, X[tr], M[tr], Y[tr], X[va], M[va], Y[va])
        self.d_in_, self.n_outputs_ = int(X.shape[2]), int(Y.shape[1])
        self.n_epochs_ = int(self.history_["epoch"].max()) if len(self.history_) else 0
        return self

    def predict(self, bags: list[np.ndarray]) -> np.ndarray:
        """Slide predictions (n, G): mean over every k in `ks` of the mean of the k highest tile scores."""
        X, M = pad_bags(bags)
        return predict_bags(self.net_, X, M, self.ks)

    def tile_scores(self, F: np.ndarray, feature_mean: np.ndarray | None = None,
                    feature_std: np.ndarray | None = None) -> np.ndarray:
        """Per-tile scores (t, G) of one slide's tiles (HE2RNA's virtual spatialisation).

        A net trained on super-tiles standardises inputs with super-tile statistics; raw tiles vary
        more (a super-tile averages many tiles), so give the raw tiles' own mean and std: tiles are
        standardised with those instead, and a tile one tile-SD out scores like a super-tile one
        super-tile-SD out (maps on the scale of the slide predictions, not inflated).
        """
        import torch

        x = np.ascontiguousarray(F, np.float32)
        net = self.net_
        if feature_mean is not None:
            x = ((x - feature_mean) / feature_std).astype(np.float32)
            net = self.net_[1:]  # the fixed standardisation layer is the first
        with torch.no_grad():
            return net(torch.from_numpy(x[None]).transpose(1, 2))[0].numpy().T

    def state_dict(self) -> dict:
        """The trained weights (torch state dict)."""
        return self.net_.state_dict()

    def load_state(self, state: dict, d_in: int, n_outputs: int) -> He2rnaRegressor:
        """Restore a fitted estimator from saved weights."""
        self.net_ = make_net(d_in, n_outputs, self.hidden, self.dropout)
        self.net_.load_state_dict(state)
        self.net_.eval()
        self.d_in_, self.n_outputs_ = d_in, n_outputs
        return self


def _train_he2rna(est: He2rnaRegressor, X, M, Y, Xv, Mv, Yv):
    import torch

    torch.manual_seed(derive_seed(est.random_state, 2))
    rng = np.random.default_rng(derive_seed(est.random_state, 3))
    real = X[M]
    net = make_net(X.shape[2], Y.shape[1], est.hidden, est.dropout, bias_init=Y.mean(0),
                   feat_mean=real.mean(0), feat_std=real.std(0) + 1e-6)
    hist = []
    if est.epochs == 0:
        net.eval()
        return net, pd.DataFrame(hist, columns=["epoch", "train_loss", "val_loss"])
    opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=est.lr, weight_decay=est.weight_decay)
    Xt, Mt, Yt = torch.from_numpy(X).transpose(1, 2), torch.from_numpy(M), torch.from_numpy(Y)
    best, best_state, bad = np.inf, None, 0
    for epoch in range(est.epochs):
        net.train()
        losses = []
        for idx in np.array_split(rng.permutation(len(X)), max(1, int(np.ceil(len(X) / est.batch_size)))):
            k = int(rng.choice(est.ks))
            pred = topk_mean(net(Xt[idx]), Mt[idx], k)
            loss = ((pred - Yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) * len(idx))
        val = float(((predict_bags(net, Xv, Mv, est.ks) - Yv) ** 2).mean()) if len(Xv) else float("nan")
        hist.append((epoch + 1, sum(losses) / len(X), val))
        if not len(Xv):
            continue
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= est.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, pd.DataFrame(hist, columns=["epoch", "train_loss", "val_loss"])


# ----------------------------------------------------------------------------------------------
# Dense heads
# ----------------------------------------------------------------------------------------------
def _mlp(sizes: list[int], *, code_at: int | None = None, dropout: float = 0.0):
    """Linear layers with ReLU between them; a sigmoid after layer `code_at` (the representation)."""
    from torch import nn

    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Sigmoid() if i + 1 == code_at else nn.ReLU())
            if dropout and i + 1 != code_at:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _train_full_batch(net, X: np.ndarray, T: np.ndarray, *, epochs: int, lr: float, weight_decay: float,
                      seed: int, batch_size: int | None = None) -> pd.DataFrame:
    """Adam on MSE, full batch (or shuffled mini-batches); returns the loss per epoch."""
    import torch

    from hefeat.learn.threads import training_threads

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    x, t = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(T, dtype=torch.float32)
    hist = []
    rows = len(x) if batch_size is None else min(batch_size, len(x))
    with training_threads(flops_per_step=6.0 * rows * sum(q.numel() for q in net.parameters())):
        net.train()
        for e in range(epochs):
            if batch_size is None or batch_size >= len(x):
                batches = [slice(None)]
            else:
                batches = np.array_split(rng.permutation(len(x)), max(1, len(x) // batch_size))
            tot = 0.0
            for b in batches:
                loss = ((net(x[b]) - t[b]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * (len(x) if isinstance(b, slice) else len(b))
            hist.append((e + 1, tot / len(x)))
        net.eval()
    return pd.DataFrame(hist, columns=["epoch", "train_loss"])


def _forward(net, X: np.ndarray, upto: int | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        m = net if upto is None else net[:upto]
        return m(torch.as_tensor(X, dtype=torch.float32)).numpy()


class SpotMLP(RegressorMixin, BaseEstimator):
    """features -> hidden (ReLU, dropout) -> genes; inputs standardised on the training data, bias = mean expression."""

    def __init__(self, hidden: int = 256, *, dropout: float = 0.2, epochs: int = 60, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 64, random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray) -> SpotMLP:
        """Train on X (n, d) and Y (n, G); returns self."""
        import torch

        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        self.mu_, self.sd_ = X.mean(0), X.std(0) + 1e-6
        torch.manual_seed(self.random_state)
        self.net_ = _mlp([X.shape[1], self.hidden, Y.shape[1]], dropout=self.dropout)
        with torch.no_grad():
            self.net_[-1].bias.copy_(torch.as_tensor(Y.mean(0), dtype=torch.float32))
        self.history_ = _train_full_batch(self.net_, (X - self.mu_) / self.sd_, Y, epochs=self.epochs, lr=self.lr,
                                          weight_decay=self.weight_decay, seed=self.random_state,
                                          batch_size=self.batch_size)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions (n, G)."""
        return _forward(self.net_, (np.asarray(X, np.float64) - self.mu_) / self.sd_)


class ExpressionRepresentation(TransformerMixin, BaseEstimator):
    """features -> hidden -> code (sigmoid) -> genes trained on expression; transform() = the code (n, code)."""

    def __init__(self, hidden: int = 1024, *, code: int = 256, epochs: int = 300, lr: float = 1e-3,
                 weight_decay: float = 1e-4, random_state: int = 0):
        self.hidden = hidden
        self.code = code
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def _sizes(self, d: int, g: int) -> list[int]:
        return [d, self.hidden, self.code, g]

    def fit(self, X: np.ndarray, Y: np.ndarray | None = None) -> ExpressionRepresentation:
        """Fit on X (n, d) and targets Y (n, G) (standardised on these data); returns self."""
        import torch

        if Y is None:
            raise HefeatError("ExpressionRepresentation needs expression targets Y")
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        self.mu_, self.sd_ = X.mean(0), X.std(0) + 1e-6
        Z = (X - self.mu_) / self.sd_
        T = (Y - Y.mean(0)) / (Y.std(0) + 1e-6)
        torch.manual_seed(self.random_state)
        self.net_ = _mlp(self._sizes(X.shape[1], T.shape[1]), code_at=2)
        self.history_ = _train_full_batch(self.net_, Z, T, epochs=self.epochs, lr=self.lr,
                                          weight_decay=self.weight_decay, seed=self.random_state)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """The code (n, code) in (0, 1)."""
        return _forward(self.net_, (np.asarray(X, np.float64) - self.mu_) / self.sd_, upto=4)


class AutoencoderCode(ExpressionRepresentation):
    """features -> hidden -> code (sigmoid) -> hidden -> features; transform() = the code (the transfer baseline)."""

    def _sizes(self, d: int, g: int) -> list[int]:
        return [d, self.hidden, self.code, self.hidden, d]

    def fit(self, X: np.ndarray, Y: np.ndarray | None = None) -> AutoencoderCode:
        """Fit on X (n, d) reconstructing its standardised self (Y ignored); returns self."""
        import torch

        X = np.asarray(X, np.float64)
        self.mu_, self.sd_ = X.mean(0), X.std(0) + 1e-6
        Z = (X - self.mu_) / self.sd_
        torch.manual_seed(self.random_state)
        self.net_ = _mlp(self._sizes(X.shape[1], X.shape[1]), code_at=2)
        self.history_ = _train_full_batch(self.net_, Z, Z, epochs=self.epochs, lr=self.lr,
                                          weight_decay=self.weight_decay, seed=self.random_state)
        return self
