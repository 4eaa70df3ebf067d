"""Grouped, seeded splits: patient k-fold, holdout lists, leave-one-group-out, site splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hefeat.errors import HefeatError


@dataclass(frozen=True)
class Fold:
    """Indices of one fold (train, test) and an optional validation part of train."""

    train: np.ndarray
    test: np.ndarray
    name: str
    val: np.ndarray | None = None


def group_kfold(groups: np.ndarray, k: int, *, seed: int = 0) -> list[Fold]:
    """k folds with whole groups (patients) in one fold; groups shuffled by `seed`, sizes balanced."""
    groups = np.asarray(groups).astype(str)
    ug = np.unique(groups)
    if k < 2 or k > len(ug):
        raise HefeatError(f"patient k-fold needs 2 <= k <= number of patients ({len(ug)}), got k={k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(ug)
    sizes = {g: int((groups == g).sum()) for g in ug}
    load = np.zeros(k)
    fold_of = {}
    for g in order:
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    fidx = np.array([fold_of[g] for g in groups])
    return [Fold(np.flatnonzero(fidx != f), np.flatnonzero(fidx == f), f"fold{f + 1}") for f in range(k)]


def leave_one_group_out(groups: np.ndarray) -> list[Fold]:
    """One fold per group (leave-one-patient-out, ST-Net)."""
    groups = np.asarray(groups).astype(str)
    return [Fold(np.flatnonzero(groups != g), np.flatnonzero(groups == g), str(g)) for g in np.unique(groups)]


def group_holdout(groups: np.ndarray, test_share: float, *, seed: int = 0) -> Fold:
    """A random share of groups as test, the rest as train."""
    groups = np.asarray(groups).astype(str)
    ug = np.random.default_rng(seed).permutation(np.unique(groups))
    n_test = max(1, int(round(test_share * len(ug))))
    test_g = set(ug[:n_test])
    is_test = np.array([g in test_g for g in groups])
    return Fold(np.flatnonzero(~is_test), np.flatnonzero(is_test), "holdout")


def holdout_from_ids(sample_ids: np.ndarray, groups: np.ndarray, test_ids: set[str]) -> Fold:
    """Test = samples whose id or group (patient) is listed; the whole group follows."""
    sample_ids, groups = np.asarray(sample_ids).astype(str), np.asarray(groups).astype(str)
    test_groups = {g for s, g in zip(sample_ids, groups, strict=True) if s in test_ids or g in test_ids}
    is_test = np.array([g in test_groups for g in groups])
    if not is_test.any() or is_test.all():
        raise HefeatError("The holdout file must name some, but not all, samples or patients")
    return Fold(np.flatnonzero(~is_test), np.flatnonzero(is_test), "holdout")


def parse_split(spec: str, sample_ids: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> list[Fold]:
    """'patient-kfold:K' | 'holdout:FILE' (one id per line) | 'patient-holdout:SHARE' | 'loo' (leave-one-patient-out)."""
    kind, _, arg = spec.partition(":")
    if kind == "patient-kfold":
        return group_kfold(groups, int(arg or 5), seed=seed)
    if kind == "holdout":
        p = Path(arg)
        if not p.exists():
            raise HefeatError(f"Holdout file not found: {arg}")
        ids = {line.strip().split(",")[0] for line in p.read_text().splitlines() if line.strip()}
        return [holdout_from_ids(sample_ids, groups, ids)]
    if kind in ("loo", "leave-one-patient-out"):
        return leave_one_group_out(groups)
    if kind == "patient-holdout":  # a seeded share of patients (fit traits' subject-level test set)
        try:
            share = float(arg or 0.1)
        except ValueError:
            raise HefeatError(f"patient-holdout needs a share of patients, e.g. patient-holdout:0.1, got {arg!r}") from None
        if not 0 < share < 1:
            raise HefeatError(f"patient-holdout share must be in (0, 1), got {share}")
        return [group_holdout(groups, share, seed=seed)]
    raise HefeatError(f"Unknown split {spec!r}: use patient-kfold:5, holdout:FILE, patient-holdout:0.1 or "
                      "leave-one-patient-out")


def site_split(sites: np.ndarray, *, val_share: float = 0.2, test_share: float = 0.2, seed: int = 0) -> Fold:
    """Train/validation/test by site: no site appears in two parts (Ektefaie et al.)."""
    sites = np.asarray(sites).astype(str)
    us = np.random.default_rng(seed).permutation(np.unique(sites))
    if len(us) < 3:
        raise HefeatError(f"A site split needs at least 3 sites, found {len(us)}")
    n_test = max(1, int(round(test_share * len(us))))
    n_val = max(1, int(round(val_share * len(us))))
    test_s, val_s = set(us[:n_test]), set(us[n_test:n_test + n_val])
    part = np.array([2 if s in test_s else 1 if s in val_s else 0 for s in sites])
    return Fold(np.flatnonzero(part == 0), np.flatnonzero(part == 2), "site", val=np.flatnonzero(part == 1))


def inner_group_folds(groups: np.ndarray, k: int, *, seed: int, y: np.ndarray | None = None) -> list[Fold]:
    """Up to k patient-grouped folds of one training part, for choosing a penalty on it alone: no group (patient)
    has rows on both sides of any fold, every row is held out once. With class labels y the folds are stratified
    by class (StratifiedGroupKFold) and k is at most the number of groups of the rarest class; [] when fewer than
    two folds can be formed."""
    groups = np.asarray(groups).astype(str)
    k = min(k, len(np.unique(groups)))
    if y is not None:
        k = min(k, *(len(np.unique(groups[y == c])) for c in np.unique(y)))
    if k < 2:
        return []
    if y is None:
        folds = group_kfold(groups, k, seed=seed)
    else:
        from sklearn.model_selection import StratifiedGroupKFold

        split = StratifiedGroupKFold(k, shuffle=True, random_state=seed % 2**32).split(groups, y, groups)
        folds = [Fold(tr, te, f"inner{i + 1}") for i, (tr, te) in enumerate(split)]
    for f in folds:
        assert_disjoint(groups, f.train, f.test)
    return folds


def assert_disjoint(groups: np.ndarray, *parts: np.ndarray) -> None:
    """Raise if any group (patient/site) appears in two of the index sets."""
    groups = np.asarray(groups).astype(str)
    seen: dict[str, int] = {}
    for i, idx in enumerate(parts):
        for g in set(groups[idx]):
            if g in seen and seen[g] != i:
                raise HefeatError(f"Leakage: group {g} is in two parts of a split")
            seen[g] = i
