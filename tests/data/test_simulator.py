import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gpl_platform.data.contract import validate_dataset
from gpl_platform.data.sources.simulator import simulate
from gpl_platform.source_settings import SimulatorConfig


def test_simulator_output_satisfies_the_contract():
    ds = simulate(SimulatorConfig(n_users=50, n_items=200, n_days=3), seed=1)
    again = validate_dataset("sim", ds.items, ds.users, ds.events.drop(columns=["day"]))
    assert len(again.events) == len(ds.events) > 0
    assert ds.events["day"].nunique() == 3
    share = ds.events.groupby("request_id")["exposed"].mean()
    assert share.between(0.2, 0.5).all()


def test_simulator_is_deterministic_and_seeded():
    cfg = SimulatorConfig(n_users=30, n_items=100, n_days=2)
    a, b, c = simulate(cfg, 3), simulate(cfg, 3), simulate(cfg, 4)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events["item_id"].equals(c.events["item_id"])


def test_ground_truth_is_content_driven():
    """Users click items of their preferred topics far more: the signal GPL's anchors can find."""
    ds = simulate(SimulatorConfig(n_users=300, n_items=600, n_days=4), seed=5)
    pref = ds.info["ground_truth"]["preference"]
    topic = ds.info["item_truth"]["topic_id"].to_numpy()
    ev = ds.events
    u = ev["user_id"].str[1:].astype(int).to_numpy()
    i = ev["item_id"].str[1:].astype(int).to_numpy()
    affinity = pref[u, topic[i]]
    label = ev["oracle_label"].astype(int).to_numpy()
    high = label[affinity > np.quantile(affinity, 0.75)].mean()
    low = label[affinity < np.quantile(affinity, 0.25)].mean()
    assert high > 2 * low
    # Item text names the item's topic, so content encoders can see it.
    assert all(ds.items["topic"].iloc[k] in ds.items["text"].iloc[k] for k in range(20))


def test_simulator_scales_to_a_million_events():
    ds = simulate(SimulatorConfig(n_users=5000, n_items=20000, n_days=10, candidates_per_request=40), seed=0)
    assert len(ds.events) > 950_000
    assert not ds.events.duplicated(["request_id", "item_id"]).any()


def test_logged_click_recall_learns_from_earlier_logged_clicks():
    """With recall="logged_clicks" the non-popular half of a request comes from the user's earlier *logged*
    clicks (co-occurring items, clicked categories): on the first day (nothing logged) recall is popularity alone;
    later, candidates match the user's true taste much better."""
    cfg = SimulatorConfig(
        n_users=300,
        n_items=800,
        n_days=8,
        recall="logged_clicks",
        exposure_share=0.1,
        exposure={"policy": "logging", "propensity_samples": 20},
    )
    ds = simulate(cfg, seed=2)
    ev = ds.events
    assert ds.info["exposure"]["recall"] == "logged_clicks" and ds.info["exposure"]["refits"] > 0
    assert not ev.duplicated(["request_id", "item_id"]).any()
    validate_dataset("sim", ds.items, ds.users, ev.drop(columns=["day"]))
    pref, topic = ds.info["ground_truth"]["preference"], ds.info["item_truth"]["topic_id"].to_numpy()
    affinity = pref[ev["user_id"].str[1:].astype(int).to_numpy(), topic[ev["item_id"].str[1:].astype(int).to_numpy()]]
    day = pd.to_datetime(ev["day"])
    first, late = (day == day.min()).to_numpy(), (day >= day.min() + pd.Timedelta(days=4)).to_numpy()
    assert affinity[late].mean() > 1.3 * affinity[first].mean()
    # the logging policy still picks the more relevant candidates among the recalled ones
    label = ev["oracle_label"].astype(int)
    assert label[ev["exposed"]].mean() > label[~ev["exposed"]].mean() + 0.03
    # deterministic under the seed, like the vectorized recall
    pd.testing.assert_frame_equal(ev, simulate(cfg, seed=2).events)


# What generates clicks and candidates: a real log has none of it, and every column of `items`/`users` is a feature.
TRUTH_COLUMNS = {"topic_id", "quality", "popularity_prior", "preference"}


@pytest.mark.parametrize("recall", ["preference", "logged_clicks"])
def test_tables_hold_observable_attributes_only(recall):
    ds = simulate(SimulatorConfig(n_users=40, n_items=120, n_days=3, recall=recall), seed=1)
    assert list(ds.items.columns) == ["item_id", "text", "topic", "runtime_min"]
    assert list(ds.users.columns) == ["user_id", "age", "country"]
    truth = ds.info["item_truth"]
    assert list(truth.columns) == ["item_id", "topic_id", "quality", "popularity_prior"]
    assert truth["item_id"].tolist() == ds.items["item_id"].tolist()
    assert ds.info["ground_truth"]["preference"].shape == (len(ds.users), 12)
    # the truth's topic code is the observable topic, one to one
    pairs = pd.DataFrame({"topic": ds.items["topic"], "topic_id": truth["topic_id"]}).drop_duplicates()
    assert pairs["topic"].is_unique and pairs["topic_id"].is_unique


def test_exported_contract_has_no_ground_truth(tmp_path):
    from gpl_platform.cli.main import app

    result = CliRunner().invoke(app, ["data", "export", str(tmp_path), "--source", "simulator"])
    assert result.exit_code == 0, result.output
    for table in ("items", "users"):
        columns = set(pd.read_parquet(tmp_path / f"{table}.parquet").columns)
        assert not columns & TRUTH_COLUMNS, (table, columns)
    assert CliRunner().invoke(app, ["data", "stats", "--source", "simulator"]).exit_code == 0


def test_feature_spec_of_an_ingested_world_has_no_ground_truth(settings):
    from gpl_platform.data import ingestion
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.features.pipeline import warehouse_spec

    warehouse = Warehouse(settings.warehouse)
    ingestion.ingest_catalog(warehouse, load_source(settings), settings.source_signature())
    spec = warehouse_spec(warehouse)
    assert spec.item_attributes == {
        "item_cat_topic": ("topic", "String"),
        "item_num_runtime_min": ("runtime_min", "Float64"),
    }
    assert set(spec.user_attributes) == {"user_num_age", "user_cat_country"}
    assert not [name for name in spec.feature_types() if "quality" in name or "popularity_prior" in name]


def test_truth_in_info_is_what_the_click_model_and_recall_use():
    """The oracle labels are draws of the click probability recomputed from ``info``: calibrated against it,
    and far likelier under it than with the items' quality shuffled; popularity-drawn recall follows
    ``popularity_prior``."""
    from gpl_platform.data.sources.simulator import click_probability

    cfg = SimulatorConfig(n_users=400, n_items=500, n_days=5)
    ds = simulate(cfg, seed=4)
    ev = ds.events
    users = pd.Index(ds.users["user_id"]).get_indexer(ev["user_id"])
    items = pd.Index(ds.info["item_truth"]["item_id"]).get_indexer(ev["item_id"])
    label = ev["oracle_label"].astype(int).to_numpy()
    truth = ds.info["item_truth"]
    p = click_probability(cfg, ds.info["ground_truth"]["preference"], truth, users, items)
    assert len(ev) > 30_000 and (users >= 0).all() and (items >= 0).all()
    decile = pd.qcut(p, 10, labels=False, duplicates="drop")
    calibration = pd.DataFrame({"p": p, "y": label}).groupby(decile).mean()
    assert (calibration["p"] - calibration["y"]).abs().max() < 0.03  # about 3 standard errors of a decile

    def log_likelihood(q):
        return float(np.sum(label * np.log(q) + (1 - label) * np.log1p(-q)))

    shuffled = truth.assign(quality=np.random.default_rng(0).permutation(truth["quality"].to_numpy()))
    p_shuffled = click_probability(cfg, ds.info["ground_truth"]["preference"], shuffled, users, items)
    assert log_likelihood(p) > log_likelihood(p_shuffled) + 500
    recalled = np.bincount(items, minlength=len(truth))
    assert pd.Series(recalled).corr(truth["popularity_prior"], method="spearman") > 0.5
