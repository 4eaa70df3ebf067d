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
    """Negative Cox partial log-likelihood (Breslow ties: tied subjects all in each other's risk sets) per event;
    0 when the batch holds no event."""
    import torch

    order = torch.argsort(times, descending=True)
    r, e, ts = risk[order], events[order], times[order]
    last = torch.searchsorted(-ts, -ts, right=True) - 1  # last position of each time's tie group
    lse = torch.logcumsumexp(r, 0)[last]
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


COX_L2_GRID = np.logspace(-2, 6, 17)  # the baseline's L2 penalties (1.0, the former fixed value, among them)


def cox_objective(gamma: np.ndarray, Z: np.ndarray, t: np.ndarray, e: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Ridge Cox objective and its gradient: minus the Breslow partial log-likelihood per event + l2 |gamma|^2 / n.

    Breslow ties: every subject with time >= t_i is in the risk set of an event at t_i, tied ones included.
    No event: the penalty alone (its minimum is gamma = 0).
    """
    n = len(Z)
    ll, g_eta = cox_loglik(Z @ gamma, t, e)
    E = max(float(np.sum(e)), 1.0)
    return -ll / E + l2 * float(gamma @ gamma) / n, -(Z.T @ g_eta) / E + 2 * l2 * gamma / n


def cox_loglik(eta: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[float, np.ndarray]:
    """Breslow partial log-likelihood sum_events [eta_i - log sum_{t_j >= t_i} exp eta_j] and its gradient in eta."""
    o = np.argsort(t, kind="stable")
    ts, es, m = np.asarray(t, float)[o], np.asarray(e, float)[o], np.asarray(eta, float)[o]
    ev = es > 0
    logS = np.logaddexp.accumulate(m[::-1])[::-1][np.searchsorted(ts, ts, side="left")]  # risk sets, ties in
    ll = float(np.sum(es[ev] * (m[ev] - logS[ev])))
    # log of sum over events k with t_k <= t_i of 1/S_k (-inf before the first event), all in log space
    logH = np.logaddexp.accumulate(np.where(ev, np.log(np.where(ev, es, 1.0)) - logS, -np.inf))
    logH = logH[np.searchsorted(ts, ts, side="right") - 1]
    g = np.empty(len(m))
    g[o] = es - np.exp(m + logH)
    return ll, g


def cox_hessian(eta: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Hessian in eta of minus the Breslow partial log-likelihood (`cox_loglik`): sum over events i of
    e_i (diag p_i - p_i p_i^T), p_i the risk set's softmax of eta (tied times in), zero outside the risk set."""
    n = len(eta)
    o = np.argsort(t, kind="stable")
    ts, es, m = np.asarray(t, float)[o], np.asarray(e, float)[o], np.asarray(eta, float)[o]
    ev = np.flatnonzero(es > 0)
    first = np.searchsorted(ts, ts[ev], side="left")  # each event's risk set: sorted rows first.. onwards
    logS = np.logaddexp.accumulate(m[::-1])[::-1][first]
    P = np.exp(m[None, :] - logS[:, None]) * (np.arange(n)[None, :] >= first[:, None])  # (events, n)
    wP = es[ev][:, None] * P
    H = np.diag(wP.sum(0)) - wP.T @ P
    out = np.empty_like(H)
    out[np.ix_(o, o)] = H
    return out


def _row_space(X: np.ndarray) -> np.ndarray:
    """An orthonormal basis V (d, r) of the row space of X, r = rank <= n (eigenvectors of the n x n Gram matrix)."""
    w, U = np.linalg.eigh(X @ X.T)
    keep = w > max(float(w.max(initial=0.0)), 1e-300) * 1e-10
    return (X.T @ U[:, keep]) / np.sqrt(w[keep])


def _cox_newton(Z: np.ndarray, t: np.ndarray, e: np.ndarray, l2: float, g0: np.ndarray,
                gtol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Minimiser of `cox_objective` by damped Newton steps (Armijo backtracking); strictly convex for l2 > 0.

    At most n coordinates (`_fit_cox`), so on small folds the r x r Hessian is cheap; it reaches a lower objective
    where L-BFGS stops on its iteration cap.
    """
    n = len(Z)
    E = max(float(np.sum(e)), 1.0)
    g = g0
    f, grad = cox_objective(g, Z, t, e, l2)
    for _ in range(max_iter):
        if float(np.max(np.abs(grad), initial=0.0)) <= gtol:
            break
        H = Z.T @ cox_hessian(Z @ g, t, e) @ Z / E
        H[np.diag_indices_from(H)] += 2 * l2 / n
        d = -np.linalg.solve(H, grad)
        dec = -float(grad @ d)  # the Newton decrement squared: the predicted decrease is dec / 2
        if dec <= 1e-12:  # quadratic region, the decrease below f's rounding: the full step, without a line search
            g = g + d
            break
        s = 1.0
        while s >= 1e-10:
            f2, grad2 = cox_objective(g + s * d, Z, t, e, l2)
            if f2 <= f - 1e-4 * s * dec:
                break
            s *= 0.5
        if s < 1e-10:  # no decrease left at working precision
            break
        g, f, grad = g + s * d, f2, grad2
    return g


NEWTON_MAX_ROWS = 256  # above it L-BFGS, warm-started along the grid, costs less than Newton's n^2 r Hessians


def _fit_cox(X, t, e, l2: float, start: np.ndarray | None = None, V: np.ndarray | None = None) -> np.ndarray:
    """Coefficients of the ridge Cox model on X (float64), warm-started at `start` if given.

    The solution lies in the row space of X (the loss sees X only through X beta, and the ridge gradient is
    2 l2 beta / n), so it is fitted on the r <= n coordinates X V of an orthonormal basis V of that space
    (`_row_space`, passed in when several penalties share X) and mapped back, beta = V gamma: the same minimum
    in at most n dimensions however many features. Newton up to NEWTON_MAX_ROWS rows (the baseline's inner
    folds: 4x faster there, benchmarks/umap_cox.py), L-BFGS above.
    """
    X = np.asarray(X, float)
    V = _row_space(X) if V is None else V
    g0 = V.T @ start if start is not None else np.zeros(V.shape[1])
    Z, t, e = X @ V, np.asarray(t, float), np.asarray(e, float)
    if len(X) <= NEWTON_MAX_ROWS:
        return V @ _cox_newton(Z, t, e, l2, g0)
    from scipy.optimize import minimize

    res = minimize(cox_objective, g0, args=(Z, t, e, l2), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-14})
    return V @ res.x


def tune_cox_l2(X, t, e, folds, grid=COX_L2_GRID) -> tuple[float, np.ndarray]:
    """The L2 penalty of `grid` with the best cross-validated partial likelihood over `folds` (inner (train, test)
    index pairs of X's rows), and that likelihood for each penalty of the grid in ascending order.

    Verweij & van Houwelingen (Stat Med 1993): fold k adds l(beta_-k) - l_-k(beta_-k), the partial likelihood of
    all of X's rows minus that of the fold's training rows, both at the coefficients fitted without fold k; it
    needs no event in the held-out part and no common scale of risks across folds (glmnet's cv deviance).
    Ties go to the larger penalty.
    """
    X, t, e = np.asarray(X, float), np.asarray(t, float), np.asarray(e, float)
    grid = np.sort(np.asarray(grid, float))[::-1]  # strongest first: warm starts along a growing norm
    cvpl = np.zeros(len(grid))
    for tr, _ in folds:
        beta, V = None, _row_space(X[tr])
        for j, l2 in enumerate(grid):
            beta = _fit_cox(X[tr], t[tr], e[tr], l2, beta, V)
            eta = X @ beta
            cvpl[j] += cox_loglik(eta, t, e)[0] - cox_loglik(eta[tr], t[tr], e[tr])[0]
    j = int(np.argmax(cvpl))
    return float(grid[j]), cvpl[::-1]


def _linear_cox(Xtr, t, e, Xte, l2: float = 1.0) -> np.ndarray:
    """Ridge-penalised linear Cox model (`_fit_cox`, penalty l2 |beta|^2 / n on the per-event Breslow
    partial likelihood); risks of Xte."""
    return np.asarray(Xte, float) @ _fit_cox(Xtr, t, e, l2)
