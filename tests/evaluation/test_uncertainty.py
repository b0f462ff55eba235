"""The paired bootstrap over worlds, seeds and test requests: planted differences it must find, noise it must
not call a difference, and the pooled-AUC approximation against exact recomputation."""

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from gpl_platform.evaluation.metrics import request_metrics
from gpl_platform.evaluation.uncertainty import _run_arrays, comparisons, helps, paired_bootstrap, paired_frame


def _frames(rng, worlds=3, seeds=3, requests=100, diff=0.0, sd_request=0.1, sd_seed=0.0, sd_world=0.0):
    """Per-request frames of methods ``a`` and ``b``: per-request AUCs sharing each request's difficulty, ``a``
    ahead by ``diff`` plus world, seed and request noise; HR@10 moves with the AUC."""
    out = {}
    for w in range(worlds):
        n = rng.integers(10, 40, requests)
        base = rng.uniform(0.4, 0.8, requests)
        world_effect = rng.normal(0, sd_world)
        for s in range(seeds):
            a = base + diff + world_effect + rng.normal(0, sd_seed) + rng.normal(0, sd_request, requests)
            b = base + rng.normal(0, sd_request, requests)
            columns = {}
            for name, values in (("a", a), ("b", b)):
                columns |= {f"{name}:auc": values, f"{name}:n": n, f"{name}:pos": np.full(requests, 3)}
                columns[f"{name}:hr@10"] = np.clip(values, 0, 1)
            out[(f"world{w}", s)] = pd.DataFrame(columns, index=pd.Index([f"r{i}" for i in range(requests)]))
    return out


def _scored(seed: int, worlds=3, seeds=3, requests=300, methods=("gpl", "exposed_only", "ips")):
    """Per-request frames built by request_metrics from candidates: method i's scores are the oracle label plus
    noise of scale 1 + i (the first method is the best)."""
    rng = np.random.default_rng(seed)
    out = {}
    for w in range(worlds):
        sizes = rng.integers(5, 40, requests)
        req = np.repeat(np.arange(requests), sizes)
        y = (rng.random(len(req)) < 0.3).astype(int)
        for s in range(seeds):
            by_method = {
                m: request_metrics(req, y, y + rng.normal(scale=1 + i, size=len(req))) for i, m in enumerate(methods)
            }
            out[(w, s)] = paired_frame(by_method)
    return out


@pytest.mark.parametrize("metric", ["gauc", "hr@10"])
def test_a_method_against_itself_is_exactly_zero(metric):
    frames = _frames(np.random.default_rng(0))
    out = paired_bootstrap(frames, "a", "a", metric, n_boot=300)
    assert out["diff"] == 0.0 and out["ci95"] == [0.0, 0.0]
    assert (out["n_worlds"], out["n_seeds"], out["n_requests"], out["n_boot"]) == (3, 3, 300, 300)
    pooled = paired_bootstrap(_scored(0, worlds=2, seeds=2, requests=100), "ips", "ips", "unexposed_auc", n_boot=200)
    assert pooled["diff"] == 0.0 and pooled["ci95"] == [0.0, 0.0]


def test_a_constant_improvement_per_request_is_found_exactly():
    delta = 0.01
    frames = _frames(np.random.default_rng(1), diff=delta, sd_request=0.0)
    # b's requests differ a lot (difficulty 0.4..0.8) but a - b is delta on every one: paired, the interval is
    # delta itself; unpaired resampling would spread it over the difficulties
    out = paired_bootstrap(frames, "a", "b", "unexposed_gauc", n_boot=500)
    assert out["diff"] == pytest.approx(delta, abs=1e-12)
    lo, hi = out["ci95"]
    assert lo == pytest.approx(delta, abs=1e-9) and hi == pytest.approx(delta, abs=1e-9) and lo > 0
    # with request noise ten times the improvement the interval still holds it and excludes 0
    noisy = paired_bootstrap(_frames(np.random.default_rng(2), diff=delta, requests=1000), "a", "b", "unexposed_gauc")
    assert noisy["ci95"][0] < delta < noisy["ci95"][1] and noisy["ci95"][0] > 0
    assert noisy["diff"] == pytest.approx(delta, abs=noisy["ci95"][1] - noisy["ci95"][0])
    against = paired_bootstrap(_frames(np.random.default_rng(2), diff=delta, requests=1000), "b", "a", "unexposed_gauc")
    assert against["diff"] == pytest.approx(-noisy["diff"]) and against["ci95"][1] < 0


def test_gauc_weights_requests_by_candidates_and_hr_counts_requests_with_a_positive():
    # one world, one seed, two requests: a wins 1.0 vs 0.0 on a 30-candidate request, loses 0.0 vs 1.0 on a
    # 10-candidate one; the second request has no positive for HR
    frame = pd.DataFrame(
        {
            "a:auc": [1.0, 0.0],
            "a:n": [30, 10],
            "a:pos": [3, 0],
            "a:hr@10": [1.0, np.nan],
            "b:auc": [0.0, 1.0],
            "b:n": [30, 10],
            "b:pos": [3, 0],
            "b:hr@10": [0.5, np.nan],
        }
    )
    assert paired_bootstrap({(0, 0): frame}, "a", "b", "gauc", n_boot=50)["diff"] == pytest.approx((30 - 10) / 40)
    assert paired_bootstrap({(0, 0): frame}, "a", "b", "hr@10", n_boot=50)["diff"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "noise, low, widest",
    [
        # pure request noise: counted twice (every level resampled as is), this was covered 99.5% of the time by
        # intervals of median half-width 1.75 standard errors of the difference over simulations, not 1.96 x 1
        ({"sd_request": 0.1}, 0.88, 1.4),
        ({"sd_request": 0.05, "sd_seed": 0.005}, 0.88, 1.4),
        # 3 worlds that disagree: without the t widening of the world part, 76%
        ({"sd_request": 0.02, "sd_world": 0.01}, 0.85, None),
    ],
)
def test_pure_noise_differences_are_covered_about_95_percent_of_the_time(noise, low, widest):
    rng = np.random.default_rng(3)
    covered, diffs, half_widths = 0, [], []
    for i in range(200):
        out = paired_bootstrap(_frames(rng, requests=60, **noise), "a", "b", "gauc", n_boot=200, seed=i)
        lo, hi = out["ci95"]
        covered += lo <= 0 <= hi
        diffs.append(out["diff"])
        half_widths.append((hi - lo) / 2)
    assert low <= covered / 200 <= 0.99
    if widest:
        # not by being needlessly wide: the spread of the difference over the simulations is its true error
        assert 0.8 < np.median(half_widths) / (1.96 * np.std(diffs)) < widest


def test_the_interval_is_a_95_percent_one():
    # one world, one seed, equal weights: the bootstrap of a mean, whose 95% interval is +-1.96 standard errors
    # (a 90% one would be +-1.64)
    frames = _frames(np.random.default_rng(10), worlds=1, seeds=1, requests=3000, sd_request=0.1)
    frame = frames[("world0", 0)].assign(**{"a:n": 20, "b:n": 20})
    lo, hi = paired_bootstrap({(0, 0): frame}, "a", "b", "gauc", n_boot=2000)["ci95"]
    diff = frame["a:auc"] - frame["b:auc"]
    assert (hi - lo) / 2 / (diff.std() / np.sqrt(len(diff))) == pytest.approx(1.96, abs=0.1)


def test_more_worlds_narrow_the_interval_when_worlds_differ():
    def width(worlds: int) -> float:
        rng = np.random.default_rng(4)
        widths = []
        for i in range(10):
            frames = _frames(rng, worlds=worlds, requests=60, sd_request=0.02, sd_world=0.02)
            lo, hi = paired_bootstrap(frames, "a", "b", "gauc", n_boot=300, seed=i)["ci95"]
            widths.append(hi - lo)
        return float(np.mean(widths))

    # the world part of the spread goes as 1 / sqrt(worlds) (and its t widening shrinks): 3 -> 12 worlds
    # measured 0.067 -> 0.042 -> 0.024
    widths = [width(w) for w in (3, 6, 12)]
    assert widths[2] < widths[1] < widths[0] and widths[2] < 0.5 * widths[0], widths


def test_pooled_auc_approximation_against_exact_recomputation():
    rng = np.random.default_rng(5)
    n_req = 1000
    sizes = rng.integers(5, 30, n_req)
    req = np.repeat(np.arange(n_req), sizes)
    y = (rng.random(len(req)) < 0.3).astype(int)
    level = rng.normal(size=n_req)[req]  # requests differ in score level: pooled AUC pairs across requests
    scores = {m: np.round(y * k + rng.normal(size=len(req)) + level, 1) for m, k in (("a", 1.0), ("b", 0.8))}
    frame = paired_frame({m: request_metrics(req, y, s) for m, s in scores.items()})
    parts = {m: _run_arrays(frame, m, "auc") for m in scores}
    assert parts["a"][3] == pytest.approx(roc_auc_score(y, scores["a"]), abs=1e-12)
    exact, linear = [], []
    for _ in range(200):
        m = np.bincount(rng.integers(0, n_req, n_req), minlength=n_req)
        exact.append(
            roc_auc_score(y, scores["a"], sample_weight=m[req]) - roc_auc_score(y, scores["b"], sample_weight=m[req])
        )
        linear.append(parts["a"][3] + m @ parts["a"][1] - parts["b"][3] - m @ parts["b"][1])
    exact, linear = np.array(exact), np.array(linear)
    spread = exact.std()
    assert np.corrcoef(exact, linear)[0, 1] > 0.98
    assert linear.std() == pytest.approx(spread, rel=0.1)
    assert np.abs(exact - linear).max() < 0.3 * spread
    # and the interval finds the better-scored method
    out = paired_bootstrap({(0, 0): frame}, "a", "b", "unexposed_auc", n_boot=500)
    assert out["ci95"][0] > 0 and out["diff"] == pytest.approx(parts["a"][3] - parts["b"][3])


def test_comparisons_shape_equals_paired_bootstrap_and_the_claim_rule():
    frames = _scored(6)
    out = comparisons(frames, "gpl", metrics=("unexposed_gauc", "unexposed_auc", "unexposed_hr@10"), n_boot=300)
    assert [(c["against"], c["metric"]) for c in out] == [
        (m, metric)
        for metric in ("unexposed_gauc", "unexposed_auc", "unexposed_hr@10")
        for m in ("exposed_only", "ips")
    ]
    assert {"method", "against", "metric", "diff", "ci95"} <= set(out[0]) and out[0]["n_requests"] == 900
    single = paired_bootstrap(frames, "gpl", "ips", "unexposed_auc", n_boot=300)
    entry = next(c for c in out if (c["against"], c["metric"]) == ("ips", "unexposed_auc"))
    assert entry["diff"] == pytest.approx(single["diff"]) and entry["ci95"] == pytest.approx(single["ci95"])
    assert all(c["ci95"][0] > 0 for c in out)  # gpl has the least noise
    assert helps(out, "exposed_only", "ips")
    assert not helps(out, "exposed_only", None)  # no control: no claim
    assert not helps(out, "exposed_only", "gpl_shuffled_labels")  # a control never compared: no claim
    reverse = comparisons(frames, "ips", ["gpl", "exposed_only"], n_boot=300)
    assert reverse[0]["ci95"][1] < 0 and not helps(reverse, "gpl", "exposed_only", method="ips")
    with pytest.raises(ValueError, match="no per-request columns"):
        comparisons(frames, "gpl", ["ukd"])


def test_unpaired_frames_are_refused():
    _, a = next(iter(_scored(7, worlds=1, seeds=1, requests=50, methods=("gpl",)).items()))
    other_mask = a.rename(columns=lambda c: c.split(":")[1]).assign(n=lambda f: f["n"] + 1)
    with pytest.raises(ValueError, match="differ in 'n'"):
        paired_frame({"gpl": a.rename(columns=lambda c: c.split(":")[1]), "ips": other_mask})
    frames = _frames(np.random.default_rng(8), worlds=1, seeds=2)
    frames[("world0", 1)] = frames[("world0", 1)].iloc[:-1]
    with pytest.raises(ValueError, match="other test requests"):
        paired_bootstrap(frames, "a", "b", "gauc")


def test_a_thousand_resamples_of_5k_requests_3_seeds_3_worlds_take_seconds():
    frames = _frames(np.random.default_rng(9), requests=5000)
    began = time.perf_counter()
    out = comparisons(frames, "a", ["b"], metrics=("gauc", "hr@10"), n_boot=1000)
    assert time.perf_counter() - began < 15 and len(out) == 2
