"""The exploration slice's metrics: the plain per-request statistics when every row is shown, and on a planted
world the oracle's numbers (over every candidate) inside the slice's interval, methods ranked alike."""

import numpy as np
import pandas as pd
import pytest

from gpl_platform.evaluation.exploration import slice_metric, slice_request_metrics, slice_section
from gpl_platform.evaluation.metrics import from_request_metrics, request_metrics


def _world(n_requests: int, n_candidates: int, shown: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Requests of ``n_candidates`` with oracle labels from a latent relevance; a uniform random ``shown`` of
    each request's candidates carry their click (the oracle label); ``propensity`` is shown / candidates."""
    rng = np.random.default_rng(seed)
    rows = n_requests * n_candidates
    relevance = rng.normal(size=rows)
    oracle = (rng.uniform(size=rows) < 1 / (1 + np.exp(-(2 * relevance - 1)))).astype(int)
    order = rng.uniform(size=(n_requests, n_candidates)).argsort(axis=1)
    exposed = (order < shown).reshape(-1)
    frame = pd.DataFrame(
        {
            "request_id": np.repeat([f"r{i:05d}" for i in range(n_requests)], n_candidates),
            "exposed": exposed,
            "clicked": np.where(exposed, oracle, np.nan),
            "propensity": shown / n_candidates,
            "oracle": oracle,
        }
    )
    return frame, relevance


def _oracle(frame: pd.DataFrame, scores: np.ndarray, metric: str) -> float:
    per_request = request_metrics(frame["request_id"].to_numpy(), frame["oracle"].to_numpy(), scores)
    if metric == "hr@10":  # the slice's hr@10 is pooled recall@10: positives in their request's top 10
        return float(per_request["hits@10"].sum() / per_request["pos"].sum())
    return from_request_metrics(per_request, metric)


def test_with_every_row_shown_the_slice_statistics_are_the_plain_ones():
    frame, relevance = _world(40, 12, 12, seed=1)
    frame["propensity"] = 1.0
    scores = relevance + np.random.default_rng(2).normal(size=len(frame))
    ours = slice_request_metrics(frame, scores, clip=20.0)
    plain = request_metrics(frame["request_id"].to_numpy(), frame["oracle"].to_numpy(), scores)
    for column in ("n", "pos", "auc", "hits@10", "pooled_pairs"):
        np.testing.assert_allclose(ours[column].to_numpy(float), plain[column].to_numpy(float), err_msg=column)


def test_a_random_score_is_about_a_half_and_the_truth_is_one():
    frame, _ = _world(300, 20, 5, seed=3)
    rng = np.random.default_rng(4)
    random = slice_request_metrics(frame, rng.uniform(size=len(frame)), clip=20.0)
    truth = slice_request_metrics(frame, frame["oracle"].to_numpy(float) + 1e-3 * rng.uniform(size=len(frame)), 20.0)
    assert slice_metric(random, "gauc") == pytest.approx(0.5, abs=0.05)
    assert slice_metric(truth, "gauc") == pytest.approx(1.0) and slice_metric(truth, "auc") == pytest.approx(1.0)


def test_on_a_planted_world_the_slice_estimates_the_oracle_and_ranks_methods_as_it_does():
    frame, relevance = _world(800, 30, 6, seed=5)
    rng = np.random.default_rng(6)
    models = {
        "gpl": relevance + rng.normal(scale=1.0, size=len(frame)),  # better
        "exposed_only": relevance + rng.normal(scale=2.5, size=len(frame)),
    }  # worse
    per_seed = {0: {name: slice_request_metrics(frame, scores, clip=20.0) for name, scores in models.items()}}
    section = slice_section(per_seed, {"exposed_only": "baseline"}, min_requests=200, n_boot=300)
    assert section["requests"] == 800 and "warning" not in section
    for name, scores in models.items():
        for metric in ("gauc", "auc", "hr@10"):
            lo, hi = section["methods"][name][metric]["ci95"]
            assert lo <= _oracle(frame, scores, metric) <= hi, (name, metric, lo, hi)
    oracle_order = sorted(models, key=lambda m: _oracle(frame, models[m], "gauc"))
    slice_order = sorted(models, key=lambda m: section["methods"][m]["gauc"]["mean"])
    assert slice_order == oracle_order == ["exposed_only", "gpl"]
    gauc_diff = next(c for c in section["comparisons"] if c["metric"] == "gauc")
    assert gauc_diff["against"] == "exposed_only" and gauc_diff["ci95"][0] > 0


def test_a_small_slice_warns():
    frame, relevance = _world(30, 10, 4, seed=7)
    per_seed = {s: {"gpl": slice_request_metrics(frame, relevance + s, clip=20.0)} for s in (0, 1)}
    section = slice_section(per_seed, {}, min_requests=200, n_boot=50)
    assert "only 30 exploration requests" in section["warning"]
    assert "comparisons" not in section  # one method: nothing to compare


def test_the_reports_show_the_slice_with_its_intervals_and_the_oracle_beside_it():
    from gpl_platform.evaluation.logged import exploration_lines
    from gpl_platform.evaluation.report import exploration_check_lines

    frame, relevance = _world(250, 20, 5, seed=8)
    per_seed = {0: {"gpl": slice_request_metrics(frame, relevance, 20.0)}}
    section = slice_section(per_seed, {}, min_requests=200, n_boot=50)
    section["oracle"] = {"gpl": {m: _oracle(frame, relevance, m) for m in ("gauc", "auc", "hr@10")}}
    mean, (lo, hi) = section["methods"]["gpl"]["gauc"]["mean"], section["methods"]["gpl"]["gauc"]["ci95"]
    check = "\n".join(exploration_check_lines(section))
    assert f"{mean:.4f} [{lo:.4f}, {hi:.4f}]" in check and f"{section['oracle']['gpl']['gauc']:.4f}" in check
    logged = "\n".join(exploration_lines({**section, "policies": ["uniform_random"], "shown": 1250, "rows": 5000}))
    assert "250 exploration test requests, 1250 shown candidates of 5000" in logged
    assert f"{mean:.4f} [{lo:.4f}, {hi:.4f}]" in logged
