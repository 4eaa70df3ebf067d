"""HTI known answers (PathoMCH's definition) and the aggregations."""

from __future__ import annotations

import numpy as np
import pytest

from hefeat.learn.aggregate import by_slide, majority_vote
from hefeat.learn.hti import hti


def test_single_combination_is_zero():
    assert hti(np.array([[1, 0], [1, 0], [1, 0], [0, 0]])) == 0.0
    assert hti(np.zeros((5, 2))) == 0.0  # no positive tile


def test_equal_thirds_over_two_traits_is_one():
    b = np.array([[1, 0]] * 4 + [[0, 1]] * 4 + [[1, 1]] * 4 + [[0, 0]] * 7)  # negatives do not count
    assert hti(b) == pytest.approx(1.0)


def test_hand_computed_mixed_case():
    """A-only 2, B-only 1, both 1 (4 positive tiles): -(.5 ln .5 + 2 * .25 ln .25) / ln 3."""
    b = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [0, 0]])
    want = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(3)
    assert hti(b) == pytest.approx(want)
    assert want == pytest.approx(0.9464, abs=1e-4)


def test_three_traits_use_seven_combinations():
    """T = 3: C = 7, so tiles spread equally over all seven combinations give 1, over three give log 3/log 7."""
    combos = [[int(c) for c in f"{i:03b}"] for i in range(1, 8)]
    assert hti(np.array(combos * 2)) == pytest.approx(1.0)
    assert hti(np.array(combos[:3])) == pytest.approx(np.log(3) / np.log(7))


def test_aggregations():
    v = np.array([0.1, 0.9, 0.8, 0.2, 0.4, 0.7])
    s = np.array(["a", "a", "a", "b", "b", "b"])
    assert by_slide(v, s).to_dict() == pytest.approx({"a": 0.6, "b": 13 / 30})
    assert by_slide(v, s, "fraction").to_dict() == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert by_slide(v, s, "topk", k=2).to_dict() == pytest.approx({"a": 0.85, "b": 0.55})
    assert majority_vote(np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]])).tolist() == [True, False, True]
