"""The streaming labelling stages: batches of whole users, the same labels as the whole-range code, and
an atomic per-range replacement."""

from dataclasses import asdict, replace

import duckdb
import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import StreamingConfig
from gpl_platform.data.batches import PLAN_TABLE, plan_user_batches
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.engine import LocalEngine
from gpl_platform.pseudo_labels.batches import GROUP_TABLE, StagedGroups
from gpl_platform.pseudo_labels.calibration import Calibration
from tests.pseudo_labels import reference_labels

KEYS = ["day", "request_id", "item_id"]
# float32 similarities computed in another batch layout round differently in the last bits (BLAS tiles);
# everything derived from them inherits it
FLOAT_TOLERANCE = 1e-6


def _reference_scores(world):
    """The whole-range reference's similarities (tests/pseudo_labels/reference_labels.py)."""
    return reference_labels.score_day_candidates(
        world.warehouse, world.days, world.encoder.encoder_id, world.generator.lineage_signature()
    )


def _reference_labels(world):
    """The whole-range reference's labels (a frame of them all) and statistics (a dict)."""
    settings = world.settings
    return reference_labels.pseudo_label_days(
        world.warehouse,
        world.days,
        world.days[0],
        encoder_id=world.encoder.encoder_id,
        generator=world.generator,
        calibration_cfg=settings.calibration,
        confidence_cfg=settings.confidence,
        history_max_items=settings.history_max_len,
        artifacts_dir=settings.artifacts_dir,
    )


def _streamed(world, engine):
    """The chain of ``world`` on another engine."""
    return replace(world.chain, engine=engine)


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
    warehouse = world.warehouse
    _reference_scores(world)
    reference = _table(warehouse, "candidate_similarities")
    stats = _streamed(world, LocalEngine(StreamingConfig(batch_candidates=10**9))).similarities(world.days)
    assert stats.batches == 1
    pd.testing.assert_frame_equal(reference, _table(warehouse, "candidate_similarities"), check_exact=True)


def test_batches_of_users_give_the_labels_of_the_whole_range_code(world):
    warehouse, days = world.warehouse, world.days
    _reference_scores(world)
    reference_frame, reference_stats = _reference_labels(world)
    reference = _table(warehouse, "pseudo_labels")
    assert len(reference) > 0

    # batches of 300 candidates, staged three batches at a time
    chain = _streamed(world, LocalEngine(StreamingConfig(batch_candidates=300, stage_candidates=900)))
    scored = chain.similarities(days)
    n_candidates = warehouse.query("SELECT count(*) AS n FROM events")["n"].iloc[0]
    assert scored.batches >= n_candidates // 300 > 3
    assert scored.staged_groups == -(-scored.batches // 3)
    stats = chain.labels(days, sample_rows=100)
    assert stats.batches > 3 and stats.staged_groups == -(-stats.batches // 3)
    labels = _table(warehouse, "pseudo_labels")
    # same rows, same arg-max anchors and versions (the calibrations were stored by the reference run)
    _assert_same_rows(reference, labels, exact_columns={"anchor_id", "calibration_version", "llm_version"})
    assert (stats.rows, stats.unexposed_candidates) == (len(reference_frame), reference_stats["unexposed_candidates"])
    assert stats.coverage == reference_stats["coverage"]
    gaps = {**asdict(stats.gaps), "days_without_calibration": list(stats.gaps.days_without_calibration)}
    assert gaps == {key: reference_stats[key] for key in gaps}
    assert list(stats.calibration_versions) == reference_stats["calibration_versions"]
    distribution = stats.distribution
    assert distribution.pseudo_label_mean == pytest.approx(reference_stats["pseudo_label_mean"], abs=1e-6)
    assert distribution.confidence_mean == pytest.approx(reference_stats["confidence_mean"], abs=1e-6)
    # what the asset plots and tabulates: a bounded sample, exact quantiles
    sample = distribution.sample
    assert len(sample) == 100 and sample["pseudo_label"].between(0, 1).all()
    assert distribution.quantiles.loc[0.5, "pseudo_label"] == pytest.approx(
        reference["pseudo_label"].median(), abs=1e-6
    )
    recorded = warehouse.query("SELECT day, n_rows FROM partitions WHERE table_name = 'pseudo_labels' ORDER BY day")
    per_day = labels.groupby("day").size()
    assert len(recorded) == len(days)
    assert recorded.set_index("day")["n_rows"].reindex(per_day.index).tolist() == per_day.tolist()


def test_streamed_embeddings_match_and_chunked_encoding_changes_nothing(world):
    warehouse = world.warehouse
    before = warehouse.query("SELECT * FROM anchor_embeddings ORDER BY day, anchor_id")
    stats = _streamed(world, LocalEngine(StreamingConfig(encode_batch_texts=7))).embeddings(world.days)
    after = warehouse.query("SELECT * FROM anchor_embeddings ORDER BY day, anchor_id")
    assert stats.anchors == len(before) == len(after) and stats.distinct_texts > 7
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
    warehouse, days = world.warehouse, world.days
    before = _anchors(warehouse)
    with warehouse.connect() as con:
        con.execute("DELETE FROM anchor_cache")
    chain = _streamed(world, LocalEngine(StreamingConfig(anchor_stage_users=7)))
    stats = chain.anchors(days)
    after = _anchors(warehouse)
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    # every distinct history generated once, even when it recurs in a later chunk
    assert stats.cache_misses == stats.distinct_histories == after["cache_key"].nunique()
    assert stats.cache_hits == 0 and stats.user_days == len(after[["day", "user_id"]].drop_duplicates()) > 7
    again = chain.anchors(days)
    assert again.cache_hits == stats.distinct_histories and again.cache_misses == 0


def test_a_generator_failing_mid_range_leaves_the_anchors_and_keeps_what_it_generated(world):
    warehouse, days = world.warehouse, world.days
    before = _anchors(warehouse)
    parts = warehouse.query("SELECT * FROM partitions WHERE table_name = 'user_anchors'")
    with warehouse.connect() as con:
        con.execute("DELETE FROM anchor_cache")
    chain = _streamed(world, LocalEngine(StreamingConfig(anchor_stage_users=7)))
    with pytest.raises(RuntimeError, match="generator lost"):
        replace(chain, generator=FailingAfter(world.generator, calls=2)).anchors(days)
    pd.testing.assert_frame_equal(before, _anchors(warehouse))
    pd.testing.assert_frame_equal(parts, warehouse.query("SELECT * FROM partitions WHERE table_name = 'user_anchors'"))
    # the two chunks generated before the failure are in the cache: a re-run reuses them
    cached = warehouse.query("SELECT count(DISTINCT cache_key) AS n FROM anchor_cache")["n"].iloc[0]
    assert 0 < cached <= 14
    stats = chain.anchors(days)
    assert stats.cache_hits == cached
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
    warehouse, days = world.warehouse, world.days
    chain = _streamed(world, LocalEngine(StreamingConfig(batch_candidates=300)))
    chain.similarities(days)
    chain.labels(days)
    before = _table(warehouse, "pseudo_labels")
    parts = warehouse.query("SELECT * FROM partitions WHERE table_name IN ('pseudo_labels', 'candidate_similarities')")
    failing = _streamed(world, FailingEngine(StreamingConfig(batch_candidates=300)))
    with pytest.raises(RuntimeError, match="worker lost"):
        failing.labels(days)
    with pytest.raises(RuntimeError, match="worker lost"):
        failing.similarities(days)
    pd.testing.assert_frame_equal(before, _table(warehouse, "pseudo_labels"))
    pd.testing.assert_frame_equal(
        parts,
        warehouse.query("SELECT * FROM partitions WHERE table_name IN ('pseudo_labels', 'candidate_similarities')"),
    )
    # and a re-run replaces the range: no duplicates
    chain.labels(days)
    pd.testing.assert_frame_equal(before, _table(warehouse, "pseudo_labels"))


def test_similarities_from_replaced_anchors_are_refused(world):
    warehouse, chain = world.warehouse, world.chain
    chain.similarities(world.days)
    chain.labels(world.days)  # fits and stores the calibrations
    with warehouse.transaction() as con:  # anchors re-made since the similarities were computed
        con.execute("UPDATE anchor_embeddings SET anchor_id = anchor_id || '-new'")
        con.execute("UPDATE user_anchors SET anchor_id = anchor_id || '-new'")
    with pytest.raises(MissingUpstreamDays, match="no longer exist"):
        chain.labels(world.days)


def _degenerate_days_of_reference(world) -> dict:
    _reference_scores(world)
    return _reference_labels(world)[1]["days_with_degenerate_calibration"]


def _degenerate_days_of_chain(world) -> dict:
    world.chain.similarities(world.days)
    return dict(world.chain.labels(world.days).gaps.days_with_degenerate_calibration)


@pytest.mark.parametrize(
    "label", [_degenerate_days_of_reference, _degenerate_days_of_chain], ids=["whole_range", "streamed"]
)
def test_a_constant_mean_pool_calibration_drops_the_day(world, label):
    """Training reads the mean-pool labels by default: a day whose mean-pool calibration is constant gets no labels
    (with the reason), even though its max-pool calibration ranks."""
    warehouse = world.warehouse
    label(world)  # fits and stores the calibrations
    labelled = set(warehouse.query("SELECT DISTINCT CAST(day AS VARCHAR) AS day FROM pseudo_labels")["day"])
    assert labelled
    stored = warehouse.query("SELECT fit_key, calibration_json FROM calibrations WHERE pooling = 'mean'")
    with warehouse.transaction() as con:
        for fit_key, text in stored.itertuples(index=False):
            fitted = Calibration.from_json(text)
            constant = replace(fitted, params={"a": 0.0, "b": fitted.b})  # what an anti-correlated fit is clamped to
            con.execute("UPDATE calibrations SET calibration_json = ? WHERE fit_key = ?", [constant.to_json(), fit_key])
    degenerate = label(world)
    assert set(degenerate) == labelled
    assert all(why.startswith("mean-pool calibration") and "constant" in why for why in degenerate.values())
    assert warehouse.query("SELECT count(*) AS n FROM pseudo_labels")["n"].iloc[0] == 0
