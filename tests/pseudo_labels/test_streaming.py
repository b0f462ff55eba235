"""The streaming labelling stages: batches of whole users, the same labels as the whole-range code, and
an atomic per-range replacement."""

import json
import shutil
from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pytest

from assets.definitions import LABELLING_ASSETS
from gpl_platform.config import StreamingConfig, load_settings
from gpl_platform.data.batches import PLAN_TABLE, plan_user_batches
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine import LocalEngine
from gpl_platform.pseudo_labels import in_memory, pipeline
from gpl_platform.pseudo_labels.anchor_stages import embed_anchors, generate_anchors
from gpl_platform.pseudo_labels.batches import GROUP_TABLE, StagedGroups
from gpl_platform.pseudo_labels.calibration import Calibration
from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder

UPSTREAM = list(LABELLING_ASSETS[: LABELLING_ASSETS.index("anchor_embeddings") + 1])
OVERRIDES = {"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}}
KEYS = ["day", "request_id", "item_id"]
# float32 similarities computed in another batch layout round differently in the last bits (BLAS tiles);
# everything derived from them inherits it
FLOAT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A warehouse with events, histories, history anchors and their vectors (no similarities yet)."""
    from assets.resources import GplSettings
    from assets.runner import run_pipeline

    data_dir = tmp_path_factory.mktemp("streaming") / "data"
    gpl = GplSettings(data_dir=str(data_dir), overrides_json=json.dumps(OVERRIDES))
    assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=UPSTREAM).success
    return data_dir


@pytest.fixture
def world(upstream, tmp_path):
    """A private copy of the upstream warehouse, and what the labelling stages need."""
    data_dir = tmp_path / "data"
    shutil.copytree(upstream, data_dir)
    settings = load_settings({"data_dir": str(data_dir), **OVERRIDES})
    warehouse = Warehouse(settings.warehouse)
    return settings, warehouse, sorted(warehouse.written_days("events")), anchor_generator(settings), sentence_encoder()


def _score(module, world, **kwargs):
    settings, warehouse, days, generator, encoder = world
    return module.score_day_candidates(warehouse, days, encoder.encoder_id, generator.lineage_signature(), **kwargs)


def _label(module, world, **kwargs):
    settings, warehouse, days, generator, encoder = world
    return module.pseudo_label_days(
        warehouse,
        days,
        days[0],
        encoder_id=encoder.encoder_id,
        generator=generator,
        calibration_cfg=settings.calibration,
        confidence_cfg=settings.confidence,
        history_max_items=settings.history_max_len,
        artifacts_dir=settings.artifacts_dir,
        **kwargs,
    )


def _table(warehouse, name):
    return warehouse.query(f"SELECT * FROM {name}").sort_values(KEYS, ignore_index=True)


def _assert_same_rows(expected, actual, exact_columns):
    assert len(expected) == len(actual) > 0
    for column in expected.columns:
        if column in exact_columns or expected[column].dtype.kind not in "f":
            pd.testing.assert_series_equal(expected[column], actual[column], check_exact=True, obj=column)
        else:
            np.testing.assert_allclose(actual[column], expected[column], rtol=0, atol=FLOAT_TOLERANCE, err_msg=column)


def test_one_batch_scores_exactly_like_the_whole_range_code(world):
    _, warehouse, *_ = world
    _score(in_memory, world)
    reference = _table(warehouse, "candidate_similarities")
    stats = _score(pipeline, world, engine=LocalEngine(StreamingConfig(batch_candidates=10**9)))
    assert stats["batches"] == 1
    pd.testing.assert_frame_equal(reference, _table(warehouse, "candidate_similarities"), check_exact=True)


def test_batches_of_users_give_the_labels_of_the_whole_range_code(world):
    settings, warehouse, days, *_ = world
    _score(in_memory, world)
    reference_labels, reference_stats = _label(in_memory, world)
    reference = _table(warehouse, "pseudo_labels")
    assert len(reference) > 0

    # batches of 300 candidates, staged three batches at a time
    engine = LocalEngine(StreamingConfig(batch_candidates=300, stage_candidates=900))
    scored = _score(pipeline, world, engine=engine)
    n_candidates = warehouse.query("SELECT count(*) AS n FROM events")["n"].iloc[0]
    assert scored["batches"] >= n_candidates // 300 > 3
    assert scored["staged_groups"] == -(-scored["batches"] // 3)
    sample, stats = _label(pipeline, world, engine=engine, sample_rows=100)
    assert stats["batches"] > 3 and stats["staged_groups"] == -(-stats["batches"] // 3)
    labels = _table(warehouse, "pseudo_labels")
    # same rows, same arg-max anchors and versions (the calibrations were stored by the reference run)
    _assert_same_rows(reference, labels, exact_columns={"anchor_id", "calibration_version", "llm_version"})
    for key in (
        "rows",
        "unexposed_candidates",
        "no_history_labelled",
        "days_without_calibration",
        "days_with_degenerate_calibration",
        "calibration_versions",
    ):
        expected = len(reference_labels) if key == "rows" else reference_stats[key]
        assert stats[key] == expected, key
    assert stats["pseudo_label_mean"] == pytest.approx(reference_stats["pseudo_label_mean"], abs=1e-6)
    # what the asset plots and tabulates: a bounded sample, exact quantiles
    assert len(sample) == 100 and sample["pseudo_label"].between(0, 1).all()
    assert stats["quantiles"].loc[0.5, "pseudo_label"] == pytest.approx(reference["pseudo_label"].median(), abs=1e-6)
    recorded = warehouse.query("SELECT day, n_rows FROM partitions WHERE table_name = 'pseudo_labels' ORDER BY day")
    per_day = labels.groupby("day").size()
    assert len(recorded) == len(days)
    assert recorded.set_index("day")["n_rows"].reindex(per_day.index).tolist() == per_day.tolist()


def test_streamed_embeddings_match_and_chunked_encoding_changes_nothing(world):
    settings, warehouse, days, generator, encoder = world
    before = warehouse.query("SELECT * FROM anchor_embeddings ORDER BY day, anchor_id")
    stats = embed_anchors(
        warehouse, days, encoder, generator=generator, engine=LocalEngine(StreamingConfig(encode_batch_texts=7))
    )
    after = warehouse.query("SELECT * FROM anchor_embeddings ORDER BY day, anchor_id")
    assert stats["anchors"] == len(before) == len(after) and stats["distinct_texts"] > 7
    pd.testing.assert_frame_equal(before.drop(columns="vector"), after.drop(columns="vector"))
    np.testing.assert_allclose(np.stack(after["vector"]), np.stack(before["vector"]), atol=FLOAT_TOLERANCE)


class FailingAfter:
    """``generator`` whose generate() fails from its ``calls``-th call on (a model lost mid-range)."""

    def __init__(self, generator, calls: int):
        self.inner, self.calls = generator, calls

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def for_day(self, day):
        return self

    def generate(self, histories, k, progress=True):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("generator lost")
        return self.inner.generate(histories, k, progress=progress)


def _anchors(warehouse):
    return warehouse.query("SELECT * FROM user_anchors ORDER BY day, user_id, anchor_rank")


def test_anchors_in_small_chunks_are_the_anchors_of_one_chunk(world):
    settings, warehouse, days, generator, _ = world
    before = _anchors(warehouse)
    with warehouse.connect() as con:
        con.execute("DELETE FROM anchor_cache")
    run = dict(k=settings.anchors.k, history_max_items=settings.anchors.history_max_items, progress=False)
    stats = generate_anchors(
        warehouse, days, generator, **run, engine=LocalEngine(StreamingConfig(anchor_stage_users=7))
    )
    after = _anchors(warehouse)
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    # every distinct history generated once, even when it recurs in a later chunk
    assert stats["cache_misses"] == stats["distinct_histories"] == after["cache_key"].nunique()
    assert stats["cache_hits"] == 0 and stats["user_days"] == len(after[["day", "user_id"]].drop_duplicates()) > 7
    again = generate_anchors(
        warehouse, days, generator, **run, engine=LocalEngine(StreamingConfig(anchor_stage_users=7))
    )
    assert again["cache_hits"] == stats["distinct_histories"] and again.get("cache_misses", 0) == 0


def test_a_generator_failing_mid_range_leaves_the_anchors_and_keeps_what_it_generated(world):
    settings, warehouse, days, generator, _ = world
    before = _anchors(warehouse)
    parts = warehouse.query("SELECT * FROM partitions WHERE table_name = 'user_anchors'")
    with warehouse.connect() as con:
        con.execute("DELETE FROM anchor_cache")
    engine = LocalEngine(StreamingConfig(anchor_stage_users=7))
    with pytest.raises(RuntimeError, match="generator lost"):
        generate_anchors(
            warehouse,
            days,
            FailingAfter(generator, calls=2),
            settings.anchors.k,
            settings.anchors.history_max_items,
            progress=False,
            engine=engine,
        )
    pd.testing.assert_frame_equal(before, _anchors(warehouse))
    pd.testing.assert_frame_equal(parts, warehouse.query("SELECT * FROM partitions WHERE table_name = 'user_anchors'"))
    # the two chunks generated before the failure are in the cache: a re-run reuses them
    cached = warehouse.query("SELECT count(DISTINCT cache_key) AS n FROM anchor_cache")["n"].iloc[0]
    assert 0 < cached <= 14
    stats = generate_anchors(
        warehouse,
        days,
        generator,
        settings.anchors.k,
        settings.anchors.history_max_items,
        progress=False,
        engine=engine,
    )
    assert stats["cache_hits"] == cached
    pd.testing.assert_frame_equal(before, _anchors(warehouse), check_exact=True)


def test_the_batch_plan_keeps_users_whole_and_bounded():
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(
        {
            "day": pd.to_datetime(["2024-01-01"] * 30 + ["2024-01-02"] * 20).date,
            "user_id": [f"u{i:02d}" for i in range(30)] + [f"u{i:02d}" for i in range(20)],
            "n": rng.integers(1, 40, 50),
        }
    )
    counts.loc[7, "n"] = 500  # one user larger than a batch gets a batch of its own
    con = duckdb.connect()
    con.register("counts", counts)
    n_batches = plan_user_batches(con, "SELECT * FROM counts", batch_rows=100)
    plan = con.execute(f"SELECT * FROM {PLAN_TABLE} ORDER BY user_code").df()
    assert len(plan) == len(counts) and plan["user_code"].tolist() == list(range(len(counts)))
    assert sorted(plan["batch"].unique()) == list(range(n_batches))  # dense numbering
    assert plan["batch"].is_monotonic_increasing  # (day, user) order
    sizes = plan.groupby("batch")["n"].sum()
    # a batch closes at the first user that reaches the bound: it exceeds it by less than that user
    assert (sizes - plan.groupby("batch")["n"].last() < 100).all()
    assert sizes.sum() == counts["n"].sum() and n_batches >= counts["n"].sum() // (100 + 500)


def test_staged_groups_hold_only_the_batches_of_their_group():
    counts = pd.DataFrame(
        {
            "day": pd.to_datetime(["2024-01-01"] * 12 + ["2024-01-02"] * 12).date,
            "user_id": [f"u{i:02d}" for i in range(12)] * 2,
            "n": 10,
        }
    )
    con = duckdb.connect()
    con.register("counts", counts)
    n_batches = plan_user_batches(con, "SELECT * FROM counts", batch_rows=30)
    assert n_batches == 8
    staged_days = []

    def stage(first_day, last_day):
        staged_days.append((first_day, last_day))
        con.execute(f"CREATE OR REPLACE TEMP TABLE staged AS SELECT * FROM {GROUP_TABLE}")

    staged = StagedGroups(con, 3, stage, lambda b: {"rows": f"SELECT * FROM staged WHERE batch = {b}"})
    for batch in range(n_batches):
        rows = con.sql(staged(batch)["rows"]).df()
        assert len(rows) == 3 and (rows["batch"] == batch).all()  # a batch's whole users
        in_stage = sorted(con.execute("SELECT DISTINCT batch FROM staged").df()["batch"])
        group = batch // 3
        assert in_stage == [b for b in range(3 * group, 3 * group + 3) if b < n_batches]
    assert staged.groups == 3
    day1, day2 = counts["day"].iloc[0], counts["day"].iloc[-1]
    assert staged_days == [(day1, day1), (day1, day2), (day2, day2)]  # the days each group spans


class FailingEngine(LocalEngine):
    """Fails after the first batch, the way a worker that dies part-way would."""

    def run(self, con, job, batches):
        for n, relation in enumerate(super().run(con, job, batches)):
            if n == 1:
                raise RuntimeError("worker lost")
            yield relation


def test_a_failed_batch_leaves_the_previous_labels(world):
    settings, warehouse, *_ = world
    engine = LocalEngine(StreamingConfig(batch_candidates=300))
    _score(pipeline, world, engine=engine)
    _label(pipeline, world, engine=engine)
    before = _table(warehouse, "pseudo_labels")
    parts = warehouse.query("SELECT * FROM partitions WHERE table_name IN ('pseudo_labels', 'candidate_similarities')")
    with pytest.raises(RuntimeError, match="worker lost"):
        _label(pipeline, world, engine=FailingEngine(StreamingConfig(batch_candidates=300)))
    with pytest.raises(RuntimeError, match="worker lost"):
        _score(pipeline, world, engine=FailingEngine(StreamingConfig(batch_candidates=300)))
    pd.testing.assert_frame_equal(before, _table(warehouse, "pseudo_labels"))
    pd.testing.assert_frame_equal(
        parts,
        warehouse.query("SELECT * FROM partitions WHERE table_name IN ('pseudo_labels', 'candidate_similarities')"),
    )
    # and a re-run replaces the range: no duplicates
    _label(pipeline, world, engine=engine)
    pd.testing.assert_frame_equal(before, _table(warehouse, "pseudo_labels"))


def test_similarities_from_replaced_anchors_are_refused(world):
    settings, warehouse, days, generator, encoder = world
    _score(pipeline, world)
    _label(pipeline, world)  # fits and stores the calibrations
    with warehouse.transaction() as con:  # anchors re-made since the similarities were computed
        con.execute("UPDATE anchor_embeddings SET anchor_id = anchor_id || '-new'")
        con.execute("UPDATE user_anchors SET anchor_id = anchor_id || '-new'")
    with pytest.raises(MissingUpstreamDays, match="no longer exist"):
        _label(pipeline, world)


@pytest.mark.parametrize("module", [in_memory, pipeline], ids=["whole_range", "streamed"])
def test_a_constant_mean_pool_calibration_drops_the_day(world, module):
    """Training reads the mean-pool labels by default: a day whose mean-pool calibration is constant gets no labels
    (with the reason), even though its max-pool calibration ranks."""
    settings, warehouse, *_ = world
    _score(module, world)
    _label(module, world)  # fits and stores the calibrations
    labelled = set(warehouse.query("SELECT DISTINCT CAST(day AS VARCHAR) AS day FROM pseudo_labels")["day"])
    assert labelled
    stored = warehouse.query("SELECT fit_key, calibration_json FROM calibrations WHERE pooling = 'mean'")
    with warehouse.transaction() as con:
        for fit_key, text in stored.itertuples(index=False):
            fitted = Calibration.from_json(text)
            constant = replace(fitted, params={"a": 0.0, "b": fitted.b})  # what an anti-correlated fit is clamped to
            con.execute("UPDATE calibrations SET calibration_json = ? WHERE fit_key = ?", [constant.to_json(), fit_key])
    _, stats = _label(module, world)
    degenerate = stats["days_with_degenerate_calibration"]
    assert set(degenerate) == labelled
    assert all(why.startswith("mean-pool calibration") and "constant" in why for why in degenerate.values())
    assert warehouse.query("SELECT count(*) AS n FROM pseudo_labels")["n"].iloc[0] == 0
