"""The GX suites and the label audit on hand-made frames (no Dagster), and the events gate over a real DuckDB
warehouse."""

from datetime import date

import numpy as np
import pandas as pd
import pytest

from gpl_platform.data.warehouse import Warehouse
from gpl_platform.pseudo_labels.audit import audit, expected_calibration_error, join_later_exposures
from gpl_platform.quality.gate import (
    check_anchor_days,
    check_anchor_embedding_days,
    check_event_days,
    check_label_days,
    check_label_days_in,
    event_day_chunks,
    failing_event_days,
    failing_label_days,
)
from gpl_platform.quality.gx_validation import merge_chunk_outcomes
from gpl_platform.quality.label_suites import (
    check_pseudo_label_distribution,
    check_pseudo_label_values,
    confidence_histogram,
    kl_divergence,
)
from gpl_platform.quality.suites import check_anchors, check_embeddings, check_event_chunks, check_events
from gpl_platform.thresholds import (
    AnchorThresholds,
    EmbeddingThresholds,
    EventThresholds,
    PseudoLabelThresholds,
    QualityConfig,
    quality_config,
)


def _labels(n=400, seed=0, label=None, confidence=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "pseudo_label": rng.beta(2, 5, n) if label is None else np.full(n, label, dtype=float),
            "confidence": rng.uniform(0.05, 1.0, n) if confidence is None else np.full(n, confidence, dtype=float),
        }
    )


def _failed(result) -> set[str]:
    return {e.name for e in result.failures}


def test_healthy_labels_pass_both_suites():
    prev, today = _labels(seed=1), _labels(seed=2)
    values, dist = check_pseudo_label_values(today), check_pseudo_label_distribution(today, prev)
    assert values.passed and dist.passed, (values.summary(), dist.summary())
    assert {e.name for e in dist.expectations} >= {
        "pseudo_label_mean",
        "confidence_quantiles",
        "high_confidence_positive_share",
        "confidence_kl_vs_previous",
    }
    assert 0 <= dist.metadata["confidence_kl_vs_previous"] < 0.2
    assert dist.metadata["rows"] == 400 and dist.metadata["failures"] == []


def test_saturated_labels_fail_with_the_reason():
    result = check_pseudo_label_distribution(_labels(label=1.0, confidence=1.0), _labels(seed=3))
    assert not result.passed
    assert {
        "pseudo_label_mean",
        "pseudo_label_std",
        "confidence_mean",
        "high_confidence_positive_share",
        "confidence_kl_vs_previous",
        "confidence_quantiles",
    } <= _failed(result)
    assert "pseudo_label_mean: observed 1" in result.summary()
    assert result.metadata["high_confidence_positive_share"] == 1.0


def test_collapsed_labels_fail():
    result = check_pseudo_label_distribution(_labels(label=0.3))
    assert _failed(result) == {"pseudo_label_std"}
    assert result.metadata["kl_skipped"] == "no previous partition"


def test_nan_and_out_of_range_values_fail():
    frame = _labels()
    frame.loc[:9, "confidence"] = np.nan
    frame.loc[10:12, "pseudo_label"] = 1.5
    result = check_pseudo_label_values(frame)
    assert _failed(result) == {"confidence_not_null", "pseudo_label_in_0_1"}
    dist = check_pseudo_label_distribution(frame.assign(confidence=np.nan))
    assert not dist.passed


def test_kl_vs_previous_day_catches_a_shift():
    cfg = PseudoLabelThresholds(kl_max=0.3)
    prev = _labels(seed=4)
    shifted = _labels(seed=5).assign(confidence=lambda f: 0.05 + 0.1 * f["confidence"])  # all in [0.05, 0.15]
    assert check_pseudo_label_distribution(_labels(seed=6), prev, cfg).passed
    result = check_pseudo_label_distribution(shifted, prev, cfg)
    assert "confidence_kl_vs_previous" in _failed(result)
    # the GX observed value (shown in the metadata) and our own smoothed KL agree
    gx_kl = next(e.observed for e in result.expectations if e.name == "confidence_kl_vs_previous")
    assert result.metadata["confidence_kl_vs_previous"] == gx_kl
    own = kl_divergence(confidence_histogram(shifted["confidence"]), confidence_histogram(prev["confidence"]))
    assert gx_kl == pytest.approx(own, rel=0.1)


def test_kl_divergence_helper():
    p = confidence_histogram([0.1, 0.2, 0.2, 0.9], bins=10)
    assert p.sum() == 4 and kl_divergence(p, p) == pytest.approx(0.0)
    assert kl_divergence(p, confidence_histogram([0.95] * 10)) > 0.5
    assert np.isfinite(kl_divergence(np.array([5.0, 0]), np.array([0, 5.0])))  # smoothed, never inf


def test_empty_partition_is_skipped_or_fails_by_config():
    empty = _labels().iloc[0:0]
    assert check_pseudo_label_distribution(empty).passed
    assert check_pseudo_label_distribution(empty).skipped == "empty partition"
    assert not check_pseudo_label_values(empty, PseudoLabelThresholds(allow_empty=False)).passed


def _anchor_frames(backend="smollm"):
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3"], "text": ["Toy Story (1995)", "Heat (1995)", "Casino"]})
    histories = pd.DataFrame(
        {"day": date(2024, 1, 2), "user_id": ["u1", "u2", "u3"], "history_item_ids": [["i1", "i2"], ["i3"], []]}
    )
    anchors = pd.DataFrame(
        {
            "day": date(2024, 1, 2),
            "user_id": ["u1", "u1", "u2", "u3"],
            "anchor_id": list("abcd"),
            "anchor_text": ["toy story", "slow-burn heist thrillers", "Casino!", "popular movies"],
            "is_fallback": [False, False, False, True],
            "fallback_reason": [None, None, None, "empty_history"],
            "backend": backend,
        }
    )
    return anchors, histories, items


def test_anchor_checks():
    anchors, histories, items = _anchor_frames()
    result = check_anchors(anchors, histories, items, AnchorThresholds(verbatim_copy_rate_max=0.5))
    # 2 of 3 generated anchors repeat a history title (case, punctuation and year ignored)
    assert _failed(result) == {"verbatim_copy_rate"}
    assert result.metadata["verbatim_copy_rate"] == pytest.approx(2 / 3)
    assert result.metadata["fallback_rate_with_history"] == 0.0  # the cold-start fallback is not counted
    assert result.metadata["cold_start_anchor_share"] == 0.25
    # a user with a request and no anchor fails
    result = check_anchors(
        anchors[anchors["user_id"] != "u2"], histories, items, AnchorThresholds(verbatim_copy_rate_max=1.0)
    )
    assert _failed(result) == {"every_user_has_anchors"} and result.metadata["users_without_anchor"] == 1
    # fallbacks of users with a history count
    fb = anchors.assign(is_fallback=True, fallback_reason=["no_usable_output"] * 3 + ["empty_history"])
    assert "fallback_rate" in _failed(check_anchors(fb, histories, items, AnchorThresholds(fallback_rate_max=0.5)))
    # the history backend copies titles by design: the verbatim rule does not apply
    hist_anchors, _, _ = _anchor_frames(backend="history")
    assert check_anchors(hist_anchors, histories, items).passed


def _sid_anchors(day: date, reason: str | None) -> pd.DataFrame:
    """The sid backend's anchors of one day of _anchor_frames' users: u1 and u2 (with a history) fall back with
    ``reason``, or get generated semantic-ID anchors when it is None; u3 (empty history) the generic anchor."""
    fallback = reason is not None
    return pd.DataFrame(
        {
            "day": day,
            "user_id": ["u1", "u2", "u3"],
            "anchor_id": [f"{day}-{u}" for u in ("u1", "u2", "u3")],
            "anchor_rank": 0,
            "anchor_text": [
                "Toy Story (1995)" if fallback else "sid 1-2 · Heat",
                "Casino" if fallback else "sid 3-1 · Toy Story",
                "popular movies",
            ],
            "is_fallback": [fallback, fallback, True],
            "fallback_reason": [reason, reason, "empty_history"],
            "backend": "sid",
        }
    )


def test_the_generators_warm_up_passes_with_its_reason_and_later_fallbacks_fail(tmp_path):
    """Before its first refit the sid generator has no model and serves history anchors by design: those days pass,
    saying why; the same fallbacks after a model served a day fail, and warm-up days still fail other rules."""
    _, histories, items = _anchor_frames()
    warm_up, served, model_lost = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)
    anchors = pd.concat(
        [_sid_anchors(warm_up, "no_sid_model"), _sid_anchors(served, None), _sid_anchors(model_lost, "no_sid_model")],
        ignore_index=True,
    )
    days_histories = pd.concat([histories.assign(day=d) for d in (warm_up, served, model_lost)], ignore_index=True)
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.connect() as con:
        con.register("_anchors", anchors)
        con.register("_histories", days_histories)
        con.register("_items", items)
        con.execute(
            "INSERT INTO user_anchors (day, user_id, anchor_id, anchor_rank, anchor_text, is_fallback, fallback_reason,"
            " backend) SELECT day, user_id, anchor_id, anchor_rank, anchor_text, is_fallback, fallback_reason, backend"
            " FROM _anchors"
        )
        con.execute(
            "INSERT INTO user_histories SELECT day, user_id, history_item_ids, len(history_item_ids), NULL, 'h'"
            " FROM _histories"
        )
        con.execute("CREATE TABLE items AS SELECT * FROM _items")
    results = check_anchor_days(wh, [warm_up, served, model_lost])
    assert results[warm_up].passed, results[warm_up].summary()
    assert "warm-up" in results[warm_up].metadata["warm_up"] and "2 users" in results[warm_up].metadata["warm_up"]
    assert results[served].passed and "warm_up" not in results[served].metadata
    assert _failed(results[model_lost]) == {"fallback_rate"}  # a model served an earlier day: no warm-up
    # what can be judged on a warm-up day still is: a user with a request and no anchor fails it
    no_anchor = check_anchors(
        _sid_anchors(warm_up, "no_sid_model").iloc[1:], histories.assign(day=warm_up), items, warm_up=True
    )
    assert _failed(no_anchor) == {"every_user_has_anchors"}


def test_embedding_checks():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    frame = pd.DataFrame({"vector": list(vecs.astype(np.float32))})
    assert check_embeddings(frame, EmbeddingThresholds(dim=8)).passed
    assert _failed(check_embeddings(frame, EmbeddingThresholds(dim=384))) == {"dimension"}
    bad = frame.copy()
    bad.at[0, "vector"] = np.full(8, np.nan, dtype=np.float32)
    bad.at[1, "vector"] = vecs[1] * 2
    bad.at[2, "vector"] = vecs[2][:5]
    result = check_embeddings(bad)
    assert _failed(result) == {"dimension", "no_nan", "unit_norm"}
    assert result.metadata["rows_with_nan"] == 1 and result.metadata["dims_seen"] == [5, 8]


def _events(n=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    exposed = rng.uniform(size=n) < 0.3
    clicked = pd.array(np.where(exposed, (rng.uniform(size=n) < 0.2).astype(int), 0), dtype="Int8")
    clicked[~exposed] = pd.NA
    return pd.DataFrame(
        {
            "day": date(2024, 1, 1),
            "request_id": [f"r{i // 20}" for i in range(n)],
            "user_id": [f"u{i // 20}" for i in range(n)],
            "item_id": [f"i{i % 20}" for i in range(n)],
            "event_time": pd.Timestamp("2024-01-01T10:00Z"),
            "exposed": exposed,
            "clicked": clicked,
        }
    )


def test_event_checks():
    events = _events()
    assert check_events(events).passed, check_events(events).summary()
    broken = pd.concat([events, events.iloc[:2]], ignore_index=True)  # duplicate request/item rows
    unexposed = broken.index[~broken["exposed"]][:3]
    broken.loc[unexposed, "clicked"] = 1  # a click label on unexposed rows
    assert _failed(check_events(broken)) == {"unique_request_item", "click_label_on_exposed_only"}
    none_exposed = events.assign(exposed=False, clicked=pd.array([pd.NA] * len(events), dtype="Int8"))
    assert "exposure_rate" in _failed(check_events(none_exposed))
    all_clicked = events.assign(clicked=events["clicked"].where(~events["exposed"], 1))
    assert _failed(check_events(all_clicked)) == {"positive_rate"}
    # a day that shows only a few candidates may click most of them: the rate is not judged there
    few = all_clicked[~all_clicked["exposed"] | (all_clicked.index < all_clicked.index[all_clicked["exposed"]][5])]
    assert int(few["exposed"].sum()) == 5 and check_events(few).passed


def _broken_day(n=600, seed=1) -> pd.DataFrame:
    """A day with every row-level fault: repeated (request, item) pairs, click labels on unexposed rows,
    a click label that is not 0/1, a missing click on an exposed row."""
    events = _events(n, seed)
    broken = pd.concat([events, events.iloc[[3, 47, 301]]], ignore_index=True)
    unexposed = broken.index[~broken["exposed"]]
    exposed = broken.index[broken["exposed"]]
    broken.loc[unexposed[[0, 9]], "clicked"] = 1
    broken.loc[exposed[4], "clicked"] = 2
    broken.loc[exposed[7], "clicked"] = pd.NA
    return broken


def _by_request(events: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    """Chunks of whole requests, as the warehouse gate cuts them (a request's rows in one chunk)."""
    part = events["request_id"].map(lambda r: int(r[1:]) % parts)
    return [events[part == k] for k in range(parts)]


def test_events_in_chunks_of_whole_requests_give_the_whole_day_result():
    broken = _broken_day()
    whole = check_events(broken)
    chunked = check_event_chunks(_by_request(broken, 4))
    assert not whole.passed and not chunked.passed
    assert (
        _failed(chunked) == _failed(whole) == {"unique_request_item", "click_label_on_exposed_only", "clicked_binary"}
    )
    for a, b in zip(whole.expectations, chunked.expectations, strict=True):
        assert (a.name, a.passed) == (b.name, b.passed)
        if isinstance(a.observed, dict):  # row rules: counts add up, the percent is over the whole day
            assert a.observed["unexpected_count"] == b.observed["unexpected_count"] > (0 if not a.passed else -1)
            assert a.observed["unexpected_percent"] == pytest.approx(b.observed["unexpected_percent"])
            assert a.checked == b.checked
        else:  # the rates: judged on the day's totals
            assert a.observed == pytest.approx(b.observed)
    assert chunked.metadata["chunks"] == 4 and whole.metadata["chunks"] == 1
    for key in ("rows", "requests", "exposure_rate", "positive_rate"):
        assert chunked.metadata[key] == pytest.approx(whole.metadata[key])


def test_the_rates_are_judged_on_the_day_not_on_each_chunk():
    events = _events(400)
    # one chunk shows nothing (its own exposure rate is 0, below the bound); the day's rate is in bounds
    quiet = events["request_id"].isin(["r0", "r1", "r2", "r3"])
    events.loc[quiet, "exposed"] = False
    events.loc[quiet, "clicked"] = pd.NA
    chunks = [events[quiet], events[~quiet]]
    assert "exposure_rate" in _failed(check_events(chunks[0]))
    result = check_event_chunks(chunks)
    assert result.passed, result.summary()
    exposure = next(e for e in result.expectations if e.name == "exposure_rate")
    assert exposure.observed == pytest.approx(events["exposed"].mean())


def test_an_empty_chunk_stream_is_the_empty_rule_and_aggregate_rules_do_not_merge():
    assert check_event_chunks([]).skipped == "empty partition"
    assert not check_event_chunks([], EventThresholds(allow_empty=False)).passed
    rates = [o for o in check_events(_events()).expectations if o.name == "exposure_rate"]
    with pytest.raises(ValueError, match="row-level"):
        merge_chunk_outcomes([rates, rates])


def test_the_warehouse_events_gate_reads_a_day_in_chunks_with_the_whole_day_result(tmp_path):
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    good, broken = _events(500, seed=2), _broken_day(700, seed=3)
    broken["day"] = date(2024, 1, 2)
    events = pd.concat([good, broken], ignore_index=True)
    events["clicked"] = events["clicked"].astype("Int8")
    with warehouse.transaction() as con:
        warehouse.replace_partitions(
            "events", events.assign(propensity=np.nan, logging_policy=None), sorted(set(events["day"])), con
        )
    whole = check_event_days(warehouse, [date(2024, 1, 1), date(2024, 1, 2)], chunk_rows=10**6)
    small = check_event_days(warehouse, [date(2024, 1, 1), date(2024, 1, 2)], chunk_rows=90)
    assert [r.metadata["chunks"] for r in whole.values()] == [1, 1]
    assert [r.metadata["chunks"] for r in small.values()] == [6, 8]  # ceil(500 / 90), ceil(703 / 90)
    assert small[date(2024, 1, 1)].passed and not small[date(2024, 1, 2)].passed
    for day in whole:
        assert [(e.name, e.passed, e.checked) for e in small[day].expectations] == [
            (e.name, e.passed, e.checked) for e in whole[day].expectations
        ]
        assert small[day].metadata["rows"] == whole[day].metadata["rows"]
    with warehouse.connect(read_only=True) as con:
        chunks = list(event_day_chunks(con, date(2024, 1, 2), 90))
    assert sum(len(c) for c in chunks) == 703 and max(len(c) for c in chunks) < 2 * 90
    assert not set.intersection(*[set(c["request_id"]) for c in chunks[:2]])  # whole requests
    assert set(failing_event_days(warehouse, [date(2024, 1, 1), date(2024, 1, 2)], chunk_rows=90)) == {date(2024, 1, 2)}
    with pytest.raises(ValueError, match="positive"):
        check_event_days(warehouse, [date(2024, 1, 1)], chunk_rows=0)


def test_quality_config_defaults_and_fallback():
    cfg = QualityConfig()
    assert cfg.pseudo_labels.kl_max > 0 and cfg.anchors.fallback_rate_max <= 1

    class NoQuality:  # Settings before `quality` is added to it
        pass

    assert quality_config(NoQuality()) == cfg
    custom = QualityConfig(events={"exposure_rate_min": 0.5})

    class WithQuality:
        quality = custom

    assert quality_config(WithQuality()).events.exposure_rate_min == 0.5


# ---- label audit -----------------------------------------------------------------------------
def _audit_frames():
    labels = pd.DataFrame(
        {
            "day": [date(2024, 1, 1)] * 4 + [date(2024, 1, 3)],
            "request_id": ["r1", "r1", "r1", "r1", "r9"],
            "user_id": ["u1", "u1", "u1", "u1", "u2"],
            "item_id": ["a", "b", "c", "d", "a"],
            "pseudo_label": [0.9, 0.1, 0.5, 0.7, 0.3],
            "confidence": [0.8, 0.5, 0.2, 0.9, 0.6],
        }
    )
    t = lambda d: pd.Timestamp(f"2024-01-0{d}T12:00Z")  # noqa: E731
    events = pd.DataFrame(
        {
            "day": [date(2024, 1, d) for d in (2, 4, 3, 1, 5, 2, 4)],
            "request_id": ["x2", "x4", "x3", "x1", "x5", "y2", "z4"],
            "user_id": ["u1", "u1", "u1", "u1", "u1", "u3", "u2"],
            "item_id": ["a", "a", "b", "c", "c", "d", "a"],
            "event_time": [t(d) for d in (2, 4, 3, 1, 5, 2, 4)],
            "exposed": [True, True, True, True, False, True, True],
            "clicked": pd.array([1, 0, 0, 1, None, 1, 0], dtype="Int8"),
        }
    )
    return labels, events


def test_join_later_exposures_takes_the_first_later_exposure_of_the_same_user():
    labels, events = _audit_frames()
    pairs = join_later_exposures(labels, events)
    got = {
        (r.user_id, r.item_id, str(r.label_day)): (str(r.exposure_day), r.lag_days, r.clicked)
        for r in pairs.itertuples()
    }
    assert got == {
        ("u1", "a", "2024-01-01"): ("2024-01-02", 1, 1),  # first of two later exposures
        ("u1", "b", "2024-01-01"): ("2024-01-03", 2, 0),
        ("u2", "a", "2024-01-03"): ("2024-01-04", 1, 0),
    }  # c: only same-day/unexposed later; d: exposed later to another user
    within = join_later_exposures(labels, events, horizon_days=1)
    assert set(within["item_id"] + within["user_id"]) == {"au1", "au2"}


def test_audit_tables():
    labels, events = _audit_frames()
    result = audit(join_later_exposures(labels, events), n_bins=10, n_labels=len(labels))
    assert result.summary["pairs"] == 3 and result.summary["later_click_rate"] == pytest.approx(1 / 3)
    rel = result.reliability.set_index("pseudo_label_bin")
    assert rel.loc["[0.90, 1.00]", "click_rate"] == 1.0 and rel.loc["[0.10, 0.20)", "click_rate"] == 0.0
    assert result.by_lag.set_index("lag")["n"].to_dict() == {"1d": 2, "2-3d": 1}
    assert list(result.by_day["label_day"].astype(str)) == ["2024-01-01", "2024-01-03"]
    assert result.summary["auc"] == 1.0  # the clicked pair has the highest pseudo-label


def test_perfectly_calibrated_labels_have_small_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    pairs = pd.DataFrame(
        {
            "label_day": date(2024, 1, 1),
            "pseudo_label": p,
            "confidence": 1.0,
            "clicked": (rng.uniform(size=p.size) < p).astype(int),
            "lag_days": 1,
        }
    )
    assert expected_calibration_error(pairs) < 0.03
    assert expected_calibration_error(pairs.assign(pseudo_label=0.99)) > 0.4


def test_empty_audit():
    labels, events = _audit_frames()
    result = audit(join_later_exposures(labels, events.iloc[0:0]))
    assert result.summary["pairs"] == 0 and result.reliability.empty and result.by_day.empty


def test_a_broken_previous_day_is_no_kl_baseline():
    d1, d2 = date(2024, 1, 1), date(2024, 1, 2)
    frame = pd.concat([_labels(label=1.0, confidence=1.0).assign(day=d1), _labels(seed=7).assign(day=d2)])
    results = check_label_days(frame, [d1, d2])
    assert not results[d1][1].passed
    assert results[d2][1].passed and "no baseline" in results[d2][1].metadata["kl_skipped"]


def _label_table(wh: Warehouse, frame: pd.DataFrame) -> None:
    """``frame`` (day, pseudo_label, confidence, optionally pseudo_label_mean_pool: else the max pool's values) as
    rows of the real pseudo_labels table."""
    n = len(frame)
    if "pseudo_label_mean_pool" not in frame:
        frame = frame.assign(pseudo_label_mean_pool=frame["pseudo_label"])
    with wh.connect() as con:
        con.register(
            "_labels", frame.assign(request_id=[f"r{i // 10}" for i in range(n)], item_id=[f"i{i}" for i in range(n)])
        )
        con.execute(
            # pandas hands NaN over as NULL: back to NaN, as a computed NaN is stored
            """INSERT INTO pseudo_labels SELECT day, request_id, 'u', item_id, TIMESTAMPTZ '2024-01-01 00:00:00+00',
               0, 0, 'a', pseudo_label, pseudo_label_mean_pool, coalesce(confidence, 'nan'::DOUBLE), 1, 1, 1, false,
               'l', 'p', 'e', 'c', 'c' FROM _labels"""
        )


def test_the_warehouse_label_gate_chunks_the_values_and_samples_a_large_day(tmp_path):
    d1, d2, d3 = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)
    bad = _labels(seed=7).assign(day=d3)
    bad.loc[[5, 390], "confidence"] = [np.nan, 1.5]  # two broken rows among 400
    frame = pd.concat([_labels(seed=1).assign(day=d1), _labels(seed=2).assign(day=d2), bad], ignore_index=True)
    wh = Warehouse(tmp_path / "w.duckdb")
    _label_table(wh, frame)
    # the warehouse holds both pooled labels (_label_table copies the max pool's)
    in_memory = check_label_days(frame.assign(pseudo_label_mean_pool=frame["pseudo_label"]), [d1, d2, d3])
    whole = check_label_days_in(wh, [d1, d2, d3], chunk_rows=10**6)
    small = check_label_days_in(wh, [d1, d2, d3], chunk_rows=150)
    for d in (d1, d2, d3):
        for a, b, c in zip(in_memory[d], whole[d], small[d], strict=True):
            assert a.passed == b.passed and [o.observed for o in a.expectations] == [o.observed for o in b.expectations]
            if a.suite == "pseudo_label_values":  # every row, three chunks: the same counts
                assert [(o.name, o.passed, o.observed["unexpected_count"]) for o in a.expectations] == [
                    (o.name, o.passed, o.observed["unexpected_count"]) for o in c.expectations
                ]
    assert _failed(small[d3][0]) == {"confidence_not_null", "confidence_in_0_1"}  # found outside any sample
    sampled = small[d2][1]
    assert sampled.passed and sampled.metadata["rows"] == 400 and sampled.metadata["distribution_sample_rows"] == 150
    assert "distribution_sample_rows" not in whole[d2][1].metadata
    mean = next(o.observed for o in sampled.expectations if o.name == "confidence_mean")
    assert mean != pytest.approx(frame.loc[frame["day"] == d2, "confidence"].mean(), abs=1e-12)  # a sample's mean...
    assert mean == pytest.approx(frame.loc[frame["day"] == d2, "confidence"].mean(), abs=0.05)  # ...close to the day's
    again = check_label_days_in(wh, [d2], chunk_rows=150)[d2][1]  # the same sample on every run
    assert [o.observed for o in again.expectations] == [o.observed for o in sampled.expectations]
    assert set(failing_label_days(wh, [d1, d2, d3], chunk_rows=150)) == {d3}


def test_the_gate_judges_the_mean_pool_labels_training_reads(tmp_path):
    """Training reads the mean-pool labels by default: a day whose max-pool labels are healthy but whose
    mean-pool labels are collapsed or out of range is refused, in memory and in the warehouse."""
    d1, d2, d3 = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)
    healthy = [_labels(seed=s).assign(pseudo_label_mean_pool=lambda f: f["pseudo_label"] * 0.9) for s in (1, 2, 3)]
    collapsed = healthy[1].assign(pseudo_label_mean_pool=0.3)
    out_of_range = healthy[2].copy()
    out_of_range.loc[:4, "pseudo_label_mean_pool"] = 1.5
    frame = pd.concat(
        [healthy[0].assign(day=d1), collapsed.assign(day=d2), out_of_range.assign(day=d3)], ignore_index=True
    )
    results = check_label_days(frame, [d1, d2, d3])
    assert results[d1][0].passed and results[d1][1].passed
    assert _failed(results[d2][1]) == {"pseudo_label_mean_pool_std"}  # the max pool alone passes
    assert _failed(results[d3][0]) == {"pseudo_label_mean_pool_in_0_1"}
    assert results[d2][1].metadata["pseudo_label_mean_pool_std"] == pytest.approx(0.0, abs=1e-12)
    wh = Warehouse(tmp_path / "w.duckdb")
    _label_table(wh, frame)
    failing = failing_label_days(wh, [d1, d2, d3], chunk_rows=150)
    assert set(failing) == {d2, d3}
    assert "pseudo_label_mean_pool_std" in failing[d2] and "pseudo_label_mean_pool_in_0_1" in failing[d3]


def test_the_warehouse_anchor_embedding_gate_reads_vectors_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [v.tolist() for v in vectors]
    rows[17] = rows[17][:6]  # another dimension
    rows[200] = [float("nan")] * 8
    frame = pd.DataFrame(
        {"day": date(2024, 1, 1), "anchor_id": [f"a{i}" for i in range(300)], "user_id": "u", "encoder_id": "e"}
    )
    frame["vector"] = rows
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.transaction() as con:
        wh.replace_partitions("anchor_embeddings", frame, [date(2024, 1, 1), date(2024, 1, 2)], con)
    whole = check_embeddings(frame, name="anchor_embeddings")
    chunked = check_anchor_embedding_days(wh, [date(2024, 1, 1), date(2024, 1, 2)], chunk_rows=64)
    day = chunked[date(2024, 1, 1)]
    assert _failed(day) == _failed(whole) == {"dimension", "no_nan", "unit_norm"}
    assert [o.observed for o in day.expectations] == [o.observed for o in whole.expectations]
    assert day.metadata["dim"] == 8 and day.metadata["dims_seen"] == [6, 8] and day.metadata["rows_with_nan"] == 1
    assert chunked[date(2024, 1, 2)].skipped == "empty partition"
