"""The Bayes ceiling: the simulator's true click probability, kept as the benchmark-only `oracle_probability`,
is the best score any label could be; it is stored with the oracle labels only, null where a source has none,
and the ceiling rows put its AUC beside the labels' and `exposed_only`'s."""

import duckdb
import numpy as np
import pandas as pd
import pytest

from gpl_platform.data import ingestion
from gpl_platform.data.contract import ContractError, validate_dataset
from gpl_platform.data.sources.simulator import click_probability, simulate
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.ceiling import bayes_auc, ceiling_row
from gpl_platform.evaluation.metrics import auc
from gpl_platform.source_settings import SimulatorConfig
from tests.helpers import tiny_contract_tables

SIGNATURE = {"source": "test"}


@pytest.fixture(scope="module")
def world():
    cfg = SimulatorConfig(n_users=150, n_items=300, n_days=3)
    return cfg, simulate(cfg, seed=2)


def test_the_simulator_keeps_the_probability_its_oracle_labels_are_drawn_from(world):
    cfg, ds = world
    ev = ds.events
    p, y = ev["oracle_probability"].to_numpy(), ev["oracle_label"].astype(int).to_numpy()
    assert ev["oracle_probability"].dtype == "float64" and ((p >= 0) & (p <= 1)).all() and len(ev) > 5_000
    users = pd.Index(ds.users["user_id"]).get_indexer(ev["user_id"])
    items = pd.Index(ds.info["item_truth"]["item_id"]).get_indexer(ev["item_id"])
    np.testing.assert_allclose(
        p, click_probability(cfg, ds.info["ground_truth"]["preference"], ds.info["item_truth"], users, items)
    )
    # the labels are Bernoulli draws of it: the rates agree within sampling noise (4 standard errors)
    assert abs(p.mean() - y.mean()) < 4 * np.sqrt((p * (1 - p)).sum()) / len(p)


def test_no_planted_score_beats_the_true_probability(world):
    _, ds = world
    ev = ds.events
    p, y = ev["oracle_probability"].to_numpy(), ev["oracle_label"].astype(int).to_numpy()
    rng = np.random.default_rng(0)
    logit = np.log(p / (1 - p))
    others = {
        "noisy_truth": logit + rng.normal(0, 0.5, len(p)),
        "item_only": ev.groupby("item_id")["oracle_probability"].transform("mean").to_numpy(),
        "user_only": ev.groupby("user_id")["oracle_probability"].transform("mean").to_numpy(),
        "random": rng.random(len(p)),
    }
    ceiling = bayes_auc(y, p)
    assert ceiling > 0.5
    assert ceiling == pytest.approx(auc(y, logit))  # any monotone transform of the truth is the same ceiling
    for name, score in others.items():
        assert auc(y, score) <= ceiling, name


def test_the_probability_never_reaches_events_and_a_source_without_it_stores_nulls(tmp_path, world):
    _, ds = world
    wh = Warehouse(tmp_path / "sim.duckdb")
    day = sorted(set(ds.events["day"]))[0]
    ingestion.ingest_event_days(wh, ds, [day], SIGNATURE)
    assert "oracle_probability" not in wh.query("SELECT * FROM events LIMIT 0").columns
    stored = wh.query("SELECT oracle_probability FROM oracle_labels")["oracle_probability"]
    expected = ds.events.loc[ds.events["day"] == day, "oracle_probability"]
    assert len(stored) == len(expected) and stored.sum() == pytest.approx(expected.sum())

    items, users, events = tiny_contract_tables()  # like MovieLens: oracle labels, no probabilities
    tiny = validate_dataset("tiny", items, users, events)
    assert tiny.events["oracle_probability"].isna().all() and tiny.events["oracle_probability"].dtype == "float64"
    other = Warehouse(tmp_path / "tiny.duckdb")
    ingestion.ingest_event_days(other, tiny, sorted(set(tiny.events["day"])), SIGNATURE)
    stored = other.query("SELECT oracle_label, oracle_probability FROM oracle_labels")
    assert len(stored) == 5 and stored["oracle_probability"].isna().all() and stored["oracle_label"].notna().all()


def test_the_contract_refuses_a_probability_outside_0_1():
    items, users, events = tiny_contract_tables()
    events["oracle_probability"] = [0.0, 0.5, 1.0, None, 0.2]
    ds = validate_dataset("tiny", items, users, events)
    assert ds.events["oracle_probability"].isna().tolist() == [False, False, False, True, False]
    events["oracle_probability"] = [0.1, 1.5, 0.3, 0.2, 0.2]
    with pytest.raises(ContractError, match="oracle_probability"):
        validate_dataset("tiny", items, users, events)


def test_an_older_warehouse_gains_the_column(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE oracle_labels (day DATE NOT NULL, request_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, "
        "oracle_label TINYINT)"
    )
    con.execute("INSERT INTO oracle_labels VALUES ('2024-01-01', 'r1', 'a', 1)")
    con.close()
    wh = Warehouse(path)
    with wh.connect():
        pass
    stored = wh.query("SELECT * FROM oracle_labels")
    assert list(stored.columns) == ingestion.ORACLE_COLUMNS and stored["oracle_probability"].isna().all()


def test_a_ceiling_row_puts_the_bayes_auc_beside_the_labels_and_exposed_only():
    part = pd.DataFrame(
        {
            "index": [0, 1, 2, 3, 4, 5],
            "oracle_label": [1, 0, 1, 0, 1, 0],
            "oracle_probability": [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],
            "pseudo_label": [0.6, 0.5, 0.4, 0.3, 0.7, 0.2],
            "pseudo_label_mean_pool": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    scores = {"mlp": np.array([0.5, 0.6, 0.7, 0.1, 0.55, 0.2])}
    row = ceiling_row(part, scores)
    assert row["n"] == 6 and row["positive_rate"] == 0.5
    assert row["bayes_auc"] == 1.0
    assert row["pseudo_label_auc_max"] == pytest.approx(8 / 9) and row["exposed_only_auc[mlp]"] == pytest.approx(7 / 9)
    assert list(row)[-1] == "bayes_auc"  # the last column of the rendered tables
    without = ceiling_row(part.assign(oracle_probability=np.nan), scores)  # a source without probabilities
    assert np.isnan(without["bayes_auc"]) and without["pseudo_label_auc_max"] == row["pseudo_label_auc_max"]
