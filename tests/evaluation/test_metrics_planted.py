"""Planted signals the metrics must find, and the vectorized GAUC against the per-group loop it replaced."""

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from gpl_platform.evaluation.metrics import (
    auc,
    from_request_metrics,
    gauc,
    hit_rate_at_k,
    per_group_auc,
    request_metrics,
    segment_metrics,
)


def _gauc_loop(groups, labels, scores) -> float:
    """The implementation ``gauc`` had before it was vectorized: one roc_auc_score per group."""
    frame = pd.DataFrame({"g": groups, "y": np.asarray(labels, dtype=int), "s": np.asarray(scores, dtype=float)})
    total, weight = 0.0, 0
    for _, part in frame.groupby("g", sort=False):
        if part["y"].nunique() < 2:
            continue
        total += roc_auc_score(part["y"], part["s"]) * len(part)
        weight += len(part)
    return float(total / weight) if weight else float("nan")


def _candidates(seed: int, n_requests: int = 400, max_positives: int | None = None):
    """Requests of 5..40 candidates, ~30% positive, a quarter exposed; scores with many ties."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 41, n_requests)
    req = np.repeat(np.array([f"r{i:04d}" for i in range(n_requests)]), sizes)
    y = (rng.random(len(req)) < 0.3).astype(int)
    if max_positives is not None:  # keep the first max_positives positives of each request
        rank = pd.Series(y).groupby(req).cumsum().to_numpy()
        y = np.where(rank > max_positives, 0, y)
    exposed = rng.random(len(req)) < 0.25
    scores = np.round(y * 0.8 + rng.normal(size=len(req)), 1)  # rounding: ties within and across classes
    return rng, req, y, exposed, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_equals_the_loop_implementation_on_random_data_with_ties(seed):
    rng, req, y, _, scores = _candidates(seed)
    # one-class groups, a one-row group and integer group ids in shuffled order
    groups = rng.permutation(np.r_[rng.integers(0, 150, len(req) - 1), 999])
    y = y.copy()
    y[groups == 7] = 0
    y[groups == 8] = 1
    assert gauc(groups, y, scores) == pytest.approx(_gauc_loop(groups, y, scores), abs=1e-9)
    per = per_group_auc(groups, y, scores).set_index("group")
    assert not per["auc"].isna().any() and {7, 8, 999}.isdisjoint(per.index)  # only groups with both classes
    for g in rng.choice(per.index.to_numpy(), 10, replace=False):
        part = groups == g
        assert per.loc[g, "n"] == part.sum()
        assert per.loc[g, "auc"] == pytest.approx(roc_auc_score(y[part], scores[part]), abs=1e-12)


def test_per_group_auc_is_vectorized():
    # 100k candidates in 3k groups: the per-group loop took ~20 s here, the ranks ~0.05 s
    rng = np.random.default_rng(0)
    groups, y = rng.integers(0, 3000, 100_000), rng.random(100_000) < 0.3
    scores = np.round(rng.normal(size=100_000), 2)
    began = time.perf_counter()
    per_group_auc(groups, y, scores)
    assert time.perf_counter() - began < 2.0


def test_request_metrics_aggregate_to_gauc_hr_and_pooled_auc():
    _, req, y, exposed, scores = _candidates(3)
    unexp = ~exposed
    frame = request_metrics(req, y, scores, unexp)
    assert frame.index.is_monotonic_increasing and frame["n"].sum() == unexp.sum()
    assert (frame["n"] == pd.Series(unexp).groupby(req).sum()[frame.index].to_numpy()).all()
    assert from_request_metrics(frame, "gauc") == pytest.approx(gauc(req[unexp], y[unexp], scores[unexp]), abs=1e-12)
    assert from_request_metrics(frame, "hr@10") == pytest.approx(
        hit_rate_at_k(req[unexp], y[unexp], scores[unexp], 10), abs=1e-12
    )
    assert from_request_metrics(frame, "auc") == pytest.approx(auc(y[unexp], scores[unexp]), abs=1e-12)
    # a resample of requests is a weighted sum of the columns: here, every request taken twice changes nothing
    twice = pd.concat([frame, frame])
    assert from_request_metrics(twice, "gauc") == pytest.approx(from_request_metrics(frame, "gauc"))
    # hits@K under ties: row order decides, as in hit_rate_at_k
    tied = request_metrics(np.array(["a"] * 3), np.array([0, 1, 0]), np.array([1.0, 1.0, 1.0]), k=1)
    assert tied.loc["a", "hits@1"] == 0 and hit_rate_at_k(np.array(["a"] * 3), [0, 1, 0], [1.0, 1, 1], 1) == 0


def test_oracle_labels_as_scores_give_gauc_hr_and_auc_one():
    _, req, y, exposed, _ = _candidates(4, max_positives=10)
    frame = request_metrics(req, y, y.astype(float), ~exposed)
    with_pos = frame[frame["pos"] > 0]
    assert len(with_pos) > 300 and (with_pos["pos"] <= 10).all()
    assert from_request_metrics(frame, "gauc") == 1.0
    assert from_request_metrics(frame, "hr@10") == 1.0 and (with_pos["hits@10"] == with_pos["pos"]).all()
    assert from_request_metrics(frame, "auc") == 1.0
    # inverted: every positive below every negative
    assert from_request_metrics(request_metrics(req, y, -y.astype(float), ~exposed), "gauc") == 0.0


def test_random_scores_give_gauc_one_half_within_the_spread_the_sizes_imply():
    rng, req, y, _, _ = _candidates(5, n_requests=2000)
    per = per_group_auc(req, y, rng.random(len(req)))
    p = pd.Series(y).groupby(req).sum()[per["group"]].to_numpy()
    q = per["n"].to_numpy() - p
    # under no signal a request's AUC has mean 1/2 and variance (p + q + 1) / (12 p q) (Mann-Whitney)
    sd = np.sqrt((per["n"] ** 2 * (p + q + 1) / (12 * p * q)).sum()) / per["n"].sum()
    value = (per["n"] * per["auc"]).sum() / per["n"].sum()
    assert abs(value - 0.5) < 4 * sd and sd < 0.01


def test_the_unexposed_mask_selects_exactly_the_unexposed_rows():
    # perfect on unexposed rows, inverted on exposed rows: a mask that lets one exposed row in, or one unexposed
    # row out of a request with both classes, moves the value off 1 (or 0)
    _, req, y, exposed, _ = _candidates(6)
    planted = np.where(exposed, 1 - y, y).astype(float)
    assert gauc(req[~exposed], y[~exposed], planted[~exposed]) == 1.0
    unexposed = request_metrics(req, y, planted, ~exposed)
    assert from_request_metrics(unexposed, "gauc") == 1.0
    assert from_request_metrics(request_metrics(req, y, planted, exposed), "gauc") == 0.0
    assert from_request_metrics(request_metrics(req, y, planted), "gauc") < 0.9
    assert segment_metrics(req, y, planted, ~exposed, "gauc") == {"n": int((~exposed).sum()), "value": 1.0}
    assert segment_metrics(req, y, planted, ~exposed, "auc")["value"] == 1.0


def test_segments_under_1000_rows_report_their_size_not_a_number():
    _, req, y, _, scores = _candidates(7)
    first = np.zeros(len(req), bool)
    first[:999] = True
    assert segment_metrics(req, y, scores, first) == {"n": 999, "value": None, "note": "under 1000 rows"}
    first[999] = True
    out = segment_metrics(req, y, scores, first, "hr@10")
    assert out["n"] == 1000 and out["value"] == pytest.approx(hit_rate_at_k(req[first], y[first], scores[first], 10))
    none_positive = segment_metrics(req, np.zeros_like(y), scores, np.ones(len(req), bool), "gauc")
    assert none_positive["value"] is None and none_positive["note"] == "no request with both classes"
