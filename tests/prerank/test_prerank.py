"""Pre-ranker: loss weighting, per-method rows, determinism, lineage round trip, serving."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gpl_platform.config import TrainingConfig
from gpl_platform.prerank.data import METHODS, method_plan
from gpl_platform.prerank.methods import TeacherLabels
from gpl_platform.prerank.model import PreRanker
from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_preranker, weighted_bce

COLUMNS = (
    ["u_clicks", "i_ctr", "ui_cosine"]
    + [f"u_history_emb[{k}]" for k in range(4)]
    + [f"i_content_emb[{k}]" for k in range(4)]
)


def test_weighted_bce_matches_the_gpl_formula_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.25, 0.0])  # an actual positive, a soft pseudo-label, an actual negative
    weights = torch.tensor([1.0, 0.5 * 0.8, 1.0])  # pseudo row: lambda 0.5 * confidence 0.8
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))]
    bce = [-math.log(p[0]), -(0.25 * math.log(p[1]) + 0.75 * math.log(1 - p[1])), -math.log(1 - p[2])]
    expected = (bce[0] + 0.4 * bce[1] + bce[2]) / 3
    assert float(weighted_bce(logits, labels, weights)) == pytest.approx(expected, rel=1e-6)
    # A zero weight removes a row's influence entirely.
    w0 = torch.tensor([1.0, 0.0, 1.0])
    assert float(weighted_bce(logits, labels, w0)) == pytest.approx((bce[0] + bce[2]) / 3, rel=1e-6)


def _train_frame():
    train = pd.DataFrame(
        {
            "day": ["d1"] * 4 + ["d2"] * 4,
            "request_id": ["r1"] * 4 + ["r2"] * 4,
            "user_id": ["u1"] * 8,
            "item_id": list("abcdabcd"),
            "exposed": [True, True, False, False, True, False, False, False],
            "clicked": [1, 0, None, None, 0, None, None, None],
        }
    )
    pseudo = pd.DataFrame(
        {
            "request_id": ["r1", "r1", "r2", "r2"],
            "item_id": ["c", "d", "b", "c"],
            "pseudo_label": [0.9, 0.1, 0.6, 0.4],
            "pseudo_label_mean_pool": [0.7, 0.2, 0.5, 0.5],
            "confidence": [0.5, 1.0, 0.2, 0.8],
        }
    )
    history = pseudo.assign(pseudo_label=[0.3, 0.3, 0.3, 0.3])
    sid = pseudo.assign(pseudo_label=[0.8, 0.8, 0.8, 0.8])
    return train, {"main": pseudo, "history": history, "sid": sid}


def test_method_plans_use_the_right_labels_and_weights():
    train, pseudo = _train_frame()
    cfg = TrainingConfig(pseudo_weight=0.5, distill_weight=0.25, negative_sample_rate=1.0, pseudo_label_pooling="max")
    teachers = {
        "ranker": TeacherLabels(np.linspace(0, 1, 8)),
        "ukd": TeacherLabels(np.linspace(1, 0, 8), weights=np.linspace(0.5, 1.5, 8)),
    }
    plans = {
        m: method_plan(
            m,
            train,
            pseudo,
            cfg,
            seed=0,
            teachers=teachers,
            propensity=np.array([0.5, 0.1, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5]),
        )
        for m in METHODS
    }
    actual_rows = [0, 1, 4]
    assert plans["exposed_only"]["row"].tolist() == actual_rows and not plans["exposed_only"]["is_pseudo"].any()
    gpl = plans["gpl"][plans["gpl"]["is_pseudo"]].set_index("row")
    assert gpl["label"].to_dict() == pytest.approx({2: 0.9, 3: 0.1, 5: 0.6, 6: 0.4})
    assert gpl["weight"].to_dict() == pytest.approx({2: 0.25, 3: 0.5, 5: 0.1, 6: 0.4})  # lambda * confidence
    assert plans["gpl_no_confidence"].query("is_pseudo")["weight"].eq(0.5).all()
    assert plans["gpl_mean_pool"].query("is_pseudo").set_index("row")["label"][2] == pytest.approx(0.7)
    assert plans["gpl_max_pool"].query("is_pseudo").set_index("row")["label"][2] == pytest.approx(0.9)
    # the pooling setting decides what gpl trains on
    mean_cfg = cfg.model_copy(update={"pseudo_label_pooling": "mean"})
    mean_plan = method_plan("gpl", train, pseudo, mean_cfg, seed=0)
    assert mean_plan.query("is_pseudo").set_index("row")["label"][2] == pytest.approx(0.7)
    assert plans["gpl_history_anchors"].query("is_pseudo")["label"].to_numpy() == pytest.approx([0.3] * 4)
    assert plans["gpl_sid"].query("is_pseudo")["label"].to_numpy() == pytest.approx([0.8] * 4)
    assert plans["pseudo_only"]["is_pseudo"].all() and len(plans["pseudo_only"]) == 4
    assert plans["pseudo_only"].set_index("row")["weight"][3] == pytest.approx(1.0)  # confidence, no lambda
    assert plans["unexposed_negative"].query("is_pseudo")["label"].eq(0).all()
    # the control: gpl's rows and weights, its labels permuted within each day
    shuffled = plans["gpl_shuffled_labels"].query("is_pseudo").set_index("row")
    assert shuffled["weight"].to_dict() == pytest.approx(gpl["weight"].to_dict())
    for day_rows in ([2, 3], [5, 6]):
        assert sorted(shuffled["label"][day_rows]) == pytest.approx(sorted(gpl["label"][day_rows]))
    distill = plans["ranker_distillation"].query("is_pseudo").set_index("row")
    assert distill["label"][7] == pytest.approx(1.0) and distill["weight"].eq(0.25).all()  # its own weight
    ukd = plans["ukd"].query("is_pseudo").set_index("row")
    assert ukd["label"][7] == pytest.approx(0.0) and ukd["weight"][7] == pytest.approx(0.25 * 1.5)  # x certainty
    ips = plans["ips"].set_index("row")["weight"]
    assert ips.mean() == pytest.approx(1.0) and ips[1] > ips[0] > ips[4]  # rarer exposure, larger weight
    with pytest.raises(ValueError, match="unknown method"):
        method_plan("nope", train, pseudo, cfg, 0)


def _toy_rows(seed=0, n=600):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(COLUMNS))).astype(np.float32)
    y = (x[:, 0] + x[:, 3] * x[:, 7] + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    return x, y


def test_training_is_deterministic_under_a_seed_and_learns():
    x, y = _toy_rows()
    rows = TrainingRows(x[:400], y[:400], np.ones(400, np.float32), np.zeros(400, bool))
    cfg = TrainConfig(budget="epochs", epochs=6, batch_size=64, seed=3, patience=6)
    a, hist = train_preranker(rows, COLUMNS, x[400:], y[400:].astype(int), config=cfg)
    b, _ = train_preranker(rows, COLUMNS, x[400:], y[400:].astype(int), config=cfg)
    c, _ = train_preranker(
        rows,
        COLUMNS,
        x[400:],
        y[400:].astype(int),
        config=TrainConfig(budget="epochs", epochs=6, batch_size=64, seed=4, patience=6),
    )
    np.testing.assert_array_equal(a.predict(x[400:]), b.predict(x[400:]))
    assert not np.array_equal(a.predict(x[400:]), c.predict(x[400:]))
    assert hist["best_valid_auc"] > 0.7


def test_bad_training_rows_are_refused():
    x, y = _toy_rows(n=10)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        TrainingRows(x, y + 2, np.ones(10), np.zeros(10, bool))
    with pytest.raises(ValueError, match="weights"):
        TrainingRows(x, y, -np.ones(10), np.zeros(10, bool))
    with pytest.raises(ValueError, match="no training rows"):
        TrainingRows(x[:0], y[:0], np.ones(0), np.zeros(0, bool))


def test_saved_model_scores_identically_and_keeps_its_lineage(tmp_path):
    x, y = _toy_rows()
    rows = TrainingRows(x, y, np.ones(len(x), np.float32), np.zeros(len(x), bool))
    model, _ = train_preranker(
        rows, COLUMNS, x[:100], y[:100].astype(int), config=TrainConfig(budget="epochs", epochs=2)
    )
    lineage = {"partitions": ["2024-01-01", "2024-01-03"], "feature_service": "prerank_v2", "calibration": "abc"}
    model.save(tmp_path / "m", lineage)
    loaded, lineage_back = PreRanker.load(tmp_path / "m")
    np.testing.assert_array_equal(model.predict(x), loaded.predict(x))
    assert lineage_back == lineage
    with pytest.raises(ValueError, match="feature columns differ"):
        loaded.layout.check(COLUMNS[:-1])


def test_time_split_leaves_excluded_days_out_of_every_part(tmp_path):
    """Days that fail their events gate are out of training and of measurement: the test part moves to
    the latest days that pass."""
    from datetime import date

    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.prerank.data import time_split

    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with warehouse.connect() as con:  # 10 days with 10 requests each
        con.execute(
            "INSERT INTO events BY NAME SELECT CAST(DATE '2024-01-01' + CAST(i // 10 AS INTEGER) AS DATE) AS day, "
            "'r' || i AS request_id, 'u' || i AS user_id, 'i1' AS item_id, "
            "TIMESTAMPTZ '2024-01-01 12:00:00+00' + to_days(CAST(i // 10 AS INTEGER)) AS event_time, "
            "false AS exposed FROM range(100) t(i)"
        )
    plain = time_split(warehouse, 0.2, 0.1)
    assert plain.test_days == [date(2024, 1, 9), date(2024, 1, 10)] and plain.valid_days == [date(2024, 1, 8)]
    broken = {date(2024, 1, 10), date(2024, 1, 3)}
    split = time_split(warehouse, 0.2, 0.1, exclude=broken)
    assert split.test_days == [date(2024, 1, 8), date(2024, 1, 9)] and split.valid_days == [date(2024, 1, 7)]
    assert not broken & set(split.train_days + split.valid_days + split.test_days)
    assert len(split.train_days) == 5
    with pytest.raises(ValueError, match="at least 3 days"):
        time_split(warehouse, 0.2, 0.1, exclude={date(2024, 1, d) for d in range(1, 9)})
