"""Evaluation metrics against hand-computed cases (docs/METHOD.md definitions)."""

import numpy as np
import pytest

from gpl_platform.evaluation.metrics import auc, coverage_at_k, diversity_at_k, gauc, hit_rate_at_k


def test_hit_rate_at_k_per_request_normalized_by_min_k_positives():
    # r1: positives a, d; ranking a > b > c > d -> HR@1 = 1/1, HR@3 = 1/2.
    # r2: positive z ranked 2nd of 2 -> HR@1 = 0, HR@3 = 1.  r3 has no positive: ignored.
    req = np.array(["r1"] * 4 + ["r2"] * 2 + ["r3"] * 2)
    y = np.array([1, 0, 0, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.9, 0.2, 0.5, 0.4])
    assert hit_rate_at_k(req, y, s, 1) == pytest.approx((1 + 0) / 2)
    assert hit_rate_at_k(req, y, s, 3) == pytest.approx((0.5 + 1) / 2)
    assert hit_rate_at_k(req, y, s, 10) == pytest.approx(1.0)


def test_gauc_weights_users_by_candidate_count_and_skips_one_class_users():
    users = np.array(["u1"] * 4 + ["u2"] * 2 + ["u3"] * 3)
    y = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.1, 0.2, 0.3])
    # u1: pairs (0.9>0.1 yes, 0.9>0.8 yes, 0.2>0.1 yes, 0.2>0.8 no) -> 3/4; u2: 0; u3 skipped.
    assert gauc(users, y, s) == pytest.approx((0.75 * 4 + 0.0 * 2) / 6)
    assert auc(np.array([0, 1]), np.array([0.2, 0.1])) == 0.0
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.1])))


def test_coverage_and_diversity():
    req = np.array(["r1", "r1", "r1", "r2", "r2", "r2"])
    items = np.array(["a", "b", "c", "a", "b", "d"])
    scores = np.array([3, 2, 1, 3, 2, 1.0])
    assert coverage_at_k(req, items, scores, 2) == pytest.approx(2 / 4)  # {a, b} of {a, b, c, d}
    e = np.eye(3)
    vectors = {"a": e[0], "b": e[0], "c": e[1], "d": e[2]}
    assert diversity_at_k(req, items, scores, vectors, 2) == pytest.approx(0.0)  # a and b identical
    assert diversity_at_k(req, items, -scores, vectors, 2) == pytest.approx(1.0)  # (c, b) and (d, b) orthogonal
