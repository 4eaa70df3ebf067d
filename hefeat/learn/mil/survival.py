"""Survival for MIL: the discrete-time NLL (PORPOISE) and Cox losses, the risk score, the quantile bins of the
training event times, and the survival metrics (C-index, time-dependent AUC) and linear Cox baseline."""

from __future__ import annotations

import numpy as np


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


def _bins(t_train: np.ndarray, e_train: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner cut points of the quantile bins of the training event times (PORPOISE)."""
    ev = t_train[e_train > 0]
    q = np.quantile(ev, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(ev) else np.array([])
    return np.unique(q)


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


def _c_index(t, e, risk) -> float:
    from lifelines.utils import concordance_index

    if e.sum() == 0:
        return float("nan")
    return float(concordance_index(t, -risk, e))


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
