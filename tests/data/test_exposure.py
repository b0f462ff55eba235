"""Exposure policies: the logging policy follows relevance, never the future, never an unexposed label;
recorded propensities are the policies' true exposure probabilities."""

import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import load_settings
from gpl_platform.data.exposure import (
    Candidates,
    LoggedCounts,
    category_matrix,
    draw_top_n,
    expose,
    exposed_counts,
    inclusion_probability,
)
from gpl_platform.data.sources.simulator import simulate
from gpl_platform.source_settings import ExposurePolicyConfig, SimulatorConfig

WORLD = SimulatorConfig(n_users=150, n_items=400, n_days=10, candidates_per_request=30, requests_per_user_per_day=0.8)


def _world_candidates(seed: int = 0):
    """Candidates and true labels of a simulator world, as integer codes."""
    ds = simulate(WORLD, seed)
    ev = ds.events
    items = ds.items["item_id"].tolist()
    cands = Candidates(
        request=pd.factorize(ev["request_id"])[0],
        user=pd.factorize(ev["user_id"])[0],
        item=pd.Index(items).get_indexer(ev["item_id"]),
        day=(pd.to_datetime(ev["day"]) - pd.Timestamp("1970-01-01")).dt.days.to_numpy(),
    )
    truth = ds.info["item_truth"]
    return (
        cands,
        ev["oracle_label"].astype(int).to_numpy(),
        truth["popularity_prior"].to_numpy(),
        np.eye(WORLD.n_topics)[truth["topic_id"].to_numpy()],
    )


def _expose(policy: str, labels=None, share=0.1, **cfg):
    cands, truth, popularity, categories = _world_candidates()
    labels = truth if labels is None else labels
    config = ExposurePolicyConfig(
        policy=policy, retrain_every_days=1, min_training_rows=100, propensity_samples=50, **cfg
    )
    return (
        cands,
        truth,
        expose(
            cands,
            labels,
            popularity,
            categories,
            share,
            1.0,
            config,
            seed=3,
            rng=np.random.default_rng(3),
            popularity_offset=0.0,
        ),
    )


def test_logging_policy_exposes_relevant_candidates_more_than_popularity_does():
    _, truth, logging = _expose("logging")
    _, _, popularity = _expose("popularity")
    # the logging model learns from clicks: exposed candidates are more often relevant than unexposed ones,
    # and more often than under a policy that ignores the user
    lift_logging = truth[logging.exposed].mean() - truth[~logging.exposed].mean()
    lift_popularity = truth[popularity.exposed].mean() - truth[~popularity.exposed].mean()
    assert lift_logging > 0.05 and lift_logging > lift_popularity + 0.05
    assert logging.info["refits"] >= 5 and logging.info["cold_start_days"] >= 1


def test_logging_policy_never_reads_the_future():
    """Flipping every label from day D on leaves exposure up to and including D unchanged (day D's
    exposure is decided before its labels are revealed), and changes later days (a feedback loop)."""
    cands, truth, base = _expose("logging")
    days = np.unique(cands.day)
    cut = days[4]
    flipped = np.where(cands.day >= cut, 1 - truth, truth)
    _, _, after = _expose("logging", labels=flipped)
    upto = cands.day <= cut
    assert np.array_equal(base.exposed[upto], after.exposed[upto])
    assert np.allclose(base.propensity[upto], after.propensity[upto])
    assert not np.array_equal(base.exposed[~upto], after.exposed[~upto])


def test_logging_policy_never_sees_unexposed_labels():
    """Only exposed rows' labels are revealed: flipping the labels of every row that stayed unexposed
    changes nothing."""
    _, truth, base = _expose("logging")
    flipped = np.where(base.exposed, truth, 1 - truth)
    _, _, after = _expose("logging", labels=flipped)
    assert np.array_equal(base.exposed, after.exposed)
    assert np.array_equal(base.propensity, after.propensity)


def test_self_selection_exposes_by_the_true_label():
    _, truth, exposure = _expose("self_selection", self_selection_strength=3.0)
    assert truth[exposure.exposed].mean() > truth[~exposure.exposed].mean() + 0.2
    assert exposure.propensity[truth == 1].mean() > exposure.propensity[truth == 0].mean()


@pytest.mark.parametrize("policy", ["popularity", "logging", "self_selection"])
def test_every_request_shows_its_share(policy):
    cands, _, exposure = _expose(policy, share=0.2, max_per_request=4)
    shown = pd.Series(exposure.exposed).groupby(cands.request).sum()
    wanted = pd.Series(exposed_counts(cands.request, 0.2, 4)).groupby(cands.request).first()
    assert shown.equals(wanted)
    # the propensities of a request sum to the number it shows (up to Monte-Carlo error)
    total = pd.Series(exposure.propensity).groupby(cands.request).sum()
    assert np.allclose(total, wanted, atol=0.35)


def test_inclusion_probabilities_match_empirical_frequencies():
    """On a large sample of draws, the estimated propensity of every row matches how often it is shown."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(3, 30, 40))
    log_weights = rng.normal(0, 1.5, len(groups))
    n_exposed = exposed_counts(groups, 0.25, None)
    estimate = inclusion_probability(np.random.default_rng(1), groups, log_weights, n_exposed, samples=4000)
    draws = np.mean([draw_top_n(rng, groups, log_weights, n_exposed) for _ in range(4000)], axis=0)
    assert np.abs(estimate - draws).max() < 0.04
    # a top-1 of two equal weights is a coin flip; of weights 1:3, 1/4 vs 3/4
    two = inclusion_probability(rng, np.zeros(2, int), np.log([1.0, 3.0]), np.ones(2, int), samples=20000)
    assert two == pytest.approx([0.25, 0.75], abs=0.015)


def test_recorded_propensities_are_calibrated_on_a_source():
    """A source's recorded propensities against its realized exposure, by propensity decile."""
    settings = load_settings(
        {
            "source": "simulator",
            "simulator": {
                "n_users": 300,
                "n_items": 600,
                "n_days": 6,
                "exposure_share": 0.1,
                "exposure": {"policy": "logging", "propensity_samples": 100},
            },
        }
    )
    from gpl_platform.data.sources import load_source

    ev = load_source(settings).events
    assert ev["propensity"].between(0, 1).all()
    bins = pd.qcut(ev["propensity"], 10, duplicates="drop")
    table = ev.groupby(bins, observed=True).agg(
        expected=("propensity", "mean"), realized=("exposed", "mean"), n=("exposed", "size")
    )
    assert len(ev) > 20000
    assert (table["expected"] - table["realized"]).abs().max() < 0.03, table


def test_logged_counts_see_only_what_is_added():
    counts = LoggedCounts(n_users=2, n_items=3, categories=category_matrix([["a"], ["a", "b"], []]))
    counts.add(np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([1, 0, 1]))
    assert counts.item_exp.tolist() == [1, 2, 0] and counts.item_clk.tolist() == [1, 1, 0]
    features = counts.features(np.array([0, 1, 0]), np.array([0, 0, 2]))
    assert features.shape == (3, 4) and np.isfinite(features).all()
    # user 0 clicked category a, user 1 only half of a (item 1 is a and b): user 0's affinity to item 0 is higher
    assert features[0, 2] > features[1, 2]
    assert features[2, 2] == 0.0  # an item without category has no affinity


def test_serving_day_by_day_equals_the_whole_timeline_and_keeps_days_in_order():
    """DailyExposure (a source whose candidates depend on earlier exposure serves it day by day) is the
    same policy as expose(): identical exposure and propensities; a day served twice or late is refused."""
    from gpl_platform.data.exposure import DailyExposure, popularity_log_weights

    cands, truth, whole = _expose("logging")
    _, _, popularity, categories = _world_candidates()
    config = ExposurePolicyConfig(policy="logging", retrain_every_days=1, min_training_rows=100, propensity_samples=50)
    policy = DailyExposure(int(cands.user.max()) + 1, len(popularity), categories, config, seed=3)
    pop_logw = popularity_log_weights(popularity, 1.0, 0.0)[cands.item]
    n_exposed = exposed_counts(cands.request, 0.1, None)
    exposed, propensity = np.zeros(len(truth), bool), np.zeros(len(truth))
    for day in np.unique(cands.day):
        rows = np.flatnonzero(cands.day == day)
        exposed[rows], propensity[rows] = policy.serve(
            int(day),
            cands.request[rows],
            cands.user[rows],
            cands.item[rows],
            truth[rows],
            pop_logw[rows],
            n_exposed[rows],
        )
    assert np.array_equal(exposed, whole.exposed) and np.array_equal(propensity, whole.propensity)
    assert policy.info() == whole.info
    with pytest.raises(ValueError, match="in order"):
        policy.serve(
            int(cands.day.min()),
            cands.request[:1],
            cands.user[:1],
            cands.item[:1],
            truth[:1],
            pop_logw[:1],
            n_exposed[:1],
        )
