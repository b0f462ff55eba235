"""The exploration slice of the benchmark sources (issue 29, ``exploration_share``): on every day a share
of the requests is served by the uniform-random policy (as many candidates shown as production would
show, drawn uniformly, propensity k/n, logging_policy 'uniform_random'); at 0 the data are as before."""

import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import load_settings
from gpl_platform.data.contract import validate_dataset
from gpl_platform.data.exploration_draw import exploration_rows
from gpl_platform.data.exposure import DailyExposure, exposed_counts
from gpl_platform.data.policies import POLICY_COLUMN, PRODUCTION_POLICY, UNIFORM_RANDOM_POLICY
from gpl_platform.data.sources import movielens as ml
from gpl_platform.data.sources.simulator import simulate
from gpl_platform.source_settings import ExposurePolicyConfig, MovieLensConfig, SimulatorConfig

#: ~200 requests a day over 4 days: every day has an exploration slice of ~40 requests
WORLD = {"n_users": 400, "n_items": 500, "n_days": 4, "requests_per_user_per_day": 0.5}
POLICIES = {
    "popularity": {},
    "logging": {"exposure": {"policy": "logging", "propensity_samples": 20, "min_training_rows": 50}},
    "self_selection": {"exposure": {"policy": "self_selection", "propensity_samples": 20}},
    "logged_clicks": {"recall": "logged_clicks", "exposure": {"policy": "logging", "propensity_samples": 20}},
}


@pytest.fixture(scope="module", params=list(POLICIES))
def worlds(request):
    """(share 0.2, share 0) of one policy, same seed."""
    cfg = {**WORLD, **POLICIES[request.param]}
    return (
        request.param,
        simulate(SimulatorConfig(**cfg, exploration_share=0.2), 3),
        simulate(SimulatorConfig(**cfg), 3),
    )


def test_share_zero_is_the_data_without_the_setting_and_keeps_the_signature():
    cfg = {**WORLD, "n_days": 2, **POLICIES["logging"]}
    without, zero = simulate(SimulatorConfig(**cfg), 5), simulate(SimulatorConfig(**cfg, exploration_share=0.0), 5)
    pd.testing.assert_frame_equal(without.events, zero.events)
    assert (zero.events[POLICY_COLUMN] == PRODUCTION_POLICY).all() and zero.info["exploration"]["rows"] == 0
    # warehouses ingested before the setting existed keep their source signature
    for source in ("simulator", "movielens-100k"):
        assert "exploration_share" not in str(load_settings({"source": source}).source_signature())
    assert load_settings({"simulator": {"exploration_share": 0.2}}).source_signature()["simulator"][
        "exploration_share"
    ] == pytest.approx(0.2)


def _per_request(events: pd.DataFrame) -> pd.DataFrame:
    return events.groupby("request_id", sort=False).agg(
        n=("item_id", "size"),
        shown=("exposed", "sum"),
        policy=(POLICY_COLUMN, "first"),
        policies=(POLICY_COLUMN, "nunique"),
        day=("day", "first"),
        p_min=("propensity", "min"),
        p_max=("propensity", "max"),
    )


def test_a_share_of_every_days_requests_is_served_uniformly(worlds):
    name, ds, base = worlds
    ev = ds.events
    validate_dataset("sim", ds.items, ds.users, ev.drop(columns=["day"]))
    req = _per_request(ev)
    assert (req["policies"] == 1).all() and set(req["policy"]) == {PRODUCTION_POLICY, UNIFORM_RANDOM_POLICY}
    explored = req["policy"] == UNIFORM_RANDOM_POLICY
    share_per_day = explored.groupby(req["day"]).mean()
    assert len(share_per_day) == WORLD["n_days"] and share_per_day.between(0.15, 0.25).all(), share_per_day
    # the production rule's number of shown candidates; propensity k/n on every row of the request
    assert (req["shown"] == np.ceil(0.25 * req["n"])).all()
    assert np.allclose(req.loc[explored, "p_min"], req.loc[explored, "shown"] / req.loc[explored, "n"])
    assert np.allclose(req.loc[explored, "p_max"], req.loc[explored, "p_min"])
    # same requests, candidates and true labels as without the slice (a recall of logged clicks learns from
    # the slice's clicks too: the same first day); clicks are the oracle label where shown
    columns = ["request_id", "user_id", "item_id", "event_time", "oracle_label"]
    same = ev["day"] == ev["day"].min() if name == "logged_clicks" else ev["day"].notna()
    pd.testing.assert_frame_equal(ev.loc[same, columns], base.events.loc[same, columns])
    shown = ev["exposed"]
    assert (ev.loc[shown, "clicked"] == ev.loc[shown, "oracle_label"]).all() and ev.loc[~shown, "clicked"].isna().all()
    assert ds.info["exploration"]["requests"] == int(explored.sum())
    assert ds.info["exploration"]["days"] == WORLD["n_days"]
    assert ds.info["exploration"]["policies"] == ev[POLICY_COLUMN].value_counts().to_dict()
    if name == "popularity":  # the production policy's own draws do not depend on the share
        production = (ev[POLICY_COLUMN] == PRODUCTION_POLICY).to_numpy()
        for column in ("exposed", "propensity"):
            assert ev.loc[production, column].equals(base.events.loc[production, column])


def test_the_slice_shows_candidates_regardless_of_popularity_and_label(worlds):
    """Uniform: each popularity quintile and both true labels are shown at their propensity's rate (k/n);
    the production policies favour popular items (popularity) or positives (self_selection)."""
    name, ds, _ = worlds
    ev = ds.events
    popularity = ds.info["item_truth"].set_index("item_id")["popularity_prior"]
    quintile = pd.qcut(ev["item_id"].map(popularity).rank(method="first"), 5, labels=False)
    label = ev["oracle_label"].astype(int)
    explored = ev[POLICY_COLUMN] == UNIFORM_RANDOM_POLICY
    part = ev[explored]
    for by in (quintile[explored], label[explored]):  # ~1200 rows a quintile: sd of a rate ~0.013
        rates = part.groupby(by)[["exposed", "propensity"]].mean()
        assert (rates["exposed"] - rates["propensity"]).abs().max() < 0.05, rates
    production = ev.loc[~explored, "exposed"]
    if name == "popularity":
        by_quintile = production.groupby(quintile[~explored]).mean()
        assert by_quintile.iloc[-1] > by_quintile.iloc[0] + 0.2, by_quintile
    if name == "self_selection":
        by_label = production.groupby(label[~explored]).mean()
        assert by_label[1] > by_label[0] + 0.2, by_label


def test_exploration_requests_are_a_per_day_random_share():
    days = np.repeat(np.arange(20000, 20010), 100)
    requests = np.arange(len(days))
    chosen = exploration_rows(np.repeat(requests, 3), np.repeat(days, 3), 0.2, seed=1)
    per_request = chosen[::3]
    assert (chosen.reshape(-1, 3) == per_request[:, None]).all()  # whole requests
    assert pd.Series(per_request).groupby(days).sum().eq(20).all()  # floor(100 * 0.2 + u) per day
    assert not np.array_equal(per_request, exploration_rows(requests, days, 0.2, seed=2))
    assert not exploration_rows(requests, days, 0.0, seed=1).any()
    # row order does not matter: a request's choice depends on the seed, the requests and their days
    order = np.random.default_rng(0).permutation(len(requests))
    assert np.array_equal(exploration_rows(requests[order], days[order], 0.2, seed=1), per_request[order])


def test_the_logging_model_learns_from_production_rows_only():
    rng = np.random.default_rng(0)
    n = 600
    requests, users, items = np.repeat(np.arange(60), 10), np.repeat(np.arange(60) % 20, 10), rng.integers(0, 50, n)
    explore = np.repeat(np.arange(60) < 15, 10)
    cfg = ExposurePolicyConfig(policy="logging", propensity_samples=10)
    policy = DailyExposure(20, 50, np.ones((50, 1)), cfg, seed=1)
    shown, propensity = policy.serve(
        19000, requests, users, items, rng.integers(0, 2, n), np.zeros(n), exposed_counts(requests, 0.3, None), explore
    )
    assert np.allclose(propensity[explore], 0.3)
    ((_, features, clicks),) = policy.logged
    assert len(features) == len(clicks) == int((shown & ~explore).sum())
    assert policy.counts.item_exp.sum() == shown.sum()  # the slice's clicks are logged like any other


def test_movielens_emits_the_slice(ml100k_dir):
    ds = ml.load_movielens(ml100k_dir, MovieLensConfig(exploration_share=0.2), seed=7)
    ev = ds.events
    req = _per_request(ev)
    explored = req["policy"] == UNIFORM_RANDOM_POLICY
    assert (req["policies"] == 1).all() and 0.18 < explored.mean() < 0.22
    per_day = explored.groupby(req["day"]).agg(["mean", "size", "sum"])
    assert (per_day.loc[per_day["size"] >= 10, "sum"] > 0).all()  # every day with 10 requests or more has some
    assert (req["shown"] == np.ceil(0.1 * req["n"])).all()
    assert np.allclose(req.loc[explored, "p_min"], req.loc[explored, "shown"] / req.loc[explored, "n"])
    assert np.allclose(req.loc[explored, "p_max"], req.loc[explored, "p_min"])
    assert ds.info["exploration"]["requests"] == int(explored.sum()) and ds.info["exposure"]["refits"] > 20
    validate_dataset("ml", ds.items, ds.users, ev.drop(columns=["day"]))
    # the logging policy shows positives more often; the slice shows them at its overall rate
    label, on = ev["oracle_label"].astype(int), (ev[POLICY_COLUMN] == UNIFORM_RANDOM_POLICY).to_numpy()
    slice_rate = ev.loc[on, "exposed"].groupby(label[on]).mean()
    production_rate = ev.loc[~on, "exposed"].groupby(label[~on]).mean()
    assert abs(slice_rate[1] - slice_rate[0]) < 0.02 and production_rate[1] > production_rate[0] + 0.05
