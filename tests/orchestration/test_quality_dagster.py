"""The asset checks and the label audit in Dagster, on one GPL run of the small simulator world.

The blocking test corrupts one day of `pseudo_labels` through the Warehouse and shows that the
pseudo-label checks fail naming that day and why, and that a stand-in training asset downstream
of `pseudo_labels` does not run on it (in the same run: Dagster's blocking checks; in a later run:
`require_label_days`).
"""

import json
import shutil
from datetime import date

import pandas as pd
import pytest
from dagster import (
    AssetCheckKey,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    BackfillPolicy,
    DagsterInstance,
    Definitions,
    TimeWindowPartitionMapping,
    asset,
    materialize,
)

from assets.partitions import partition_days, range_tags
from assets.resources import GplSettings, gpl_resources
from gpl_platform.quality.gate import require_label_days
from gpl_platform.quality.results import QualityGateError

HISTORY = json.dumps({"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}})
PIPELINE = [
    "candidate_events",
    "user_histories",
    "user_anchors",
    "anchor_embeddings",
    "candidate_similarities",
    "similarity_calibration",
    "pseudo_labels",
]
LABEL_CHECKS = ["pseudo_labels_valid", "pseudo_labels_distribution"]
CONSUMED: list[list[str]] = []

pytestmark = pytest.mark.slow  # one real GPL run (encoder load) shared by the module: ~30 s


@pytest.fixture(scope="module")
def everything(dagster_defs):
    """The project's assets and checks, plus a stand-in training asset that records which days it consumed."""
    partitions = dagster_defs.resolve_job_def("gpl_daily").partitions_def

    @asset(
        partitions_def=partitions,
        backfill_policy=BackfillPolicy.single_run(),
        group_name="training",
        deps=[AssetDep("pseudo_labels", partition_mapping=TimeWindowPartitionMapping())],
    )
    def training_consumer(context: AssetExecutionContext) -> None:
        """Stand-in for the training asset: records which days it consumed."""
        CONSUMED.append(list(context.partition_keys))

    return [*dagster_defs.assets, *dagster_defs.asset_checks, training_consumer]


def _run(everything, gpl, selection, instance, **kwargs):
    return materialize(everything, selection=selection, resources=gpl_resources(gpl), instance=instance, **kwargs)


@pytest.fixture(scope="module")
def world(tmp_path_factory, everything):
    """Ingestion + GPL for all 5 days (with their checks), in one ephemeral instance."""
    tmp = tmp_path_factory.mktemp("quality")
    gpl = GplSettings(data_dir=str(tmp / "data"), overrides_json=HISTORY)
    instance = DagsterInstance.ephemeral()
    assert _run(everything, gpl, ["item_catalog", "users", "item_embeddings"], instance).success
    result = _run(
        everything, gpl, AssetSelection.assets(*PIPELINE), instance, tags=range_tags("2024-01-01", "2024-01-05")
    )
    assert result.success
    return gpl, instance, result, tmp


def _evaluations(result) -> dict[str, dict[str, object]]:
    """check name -> {partition: evaluation}."""
    out: dict[str, dict[str, object]] = {}
    for e in result.get_asset_check_evaluations():
        out.setdefault(e.check_name, {})[e.partition] = e
    return out


def test_definitions_with_checks_audit_and_schedules_load(dagster_defs):
    Definitions.validate_loadable(dagster_defs)
    graph = dagster_defs.resolve_asset_graph()
    checks = {k.name for k in graph.asset_check_keys}
    assert (
        set(LABEL_CHECKS)
        | {"user_anchors_quality", "anchor_embeddings_valid", "item_embeddings_valid", "candidate_events_contract"}
        <= checks
    )
    assert AssetKey("label_audit") in graph.get_all_asset_keys()
    job_checks = {k.name for k in dagster_defs.resolve_job_def("gpl_daily").asset_layer.asset_graph.asset_check_keys}
    assert set(LABEL_CHECKS) <= job_checks  # the daily job runs the checks of its assets


def test_all_checks_pass_on_a_healthy_run_with_one_result_per_day(world):
    gpl, instance, result, _ = world
    evals = _evaluations(result)
    assert {
        "pseudo_labels_valid",
        "pseudo_labels_distribution",
        "user_anchors_quality",
        "anchor_embeddings_valid",
        "candidate_events_contract",
    } <= set(evals)
    days = [f"2024-01-0{d}" for d in range(1, 6)]
    for name, by_day in evals.items():
        assert sorted(by_day) == days, name  # a range run records every day's result separately
        for day, ev in by_day.items():
            assert ev.passed, (name, day, ev.description)
    dist = evals["pseudo_labels_distribution"]["2024-01-05"]
    assert dist.metadata["day"].value == "2024-01-05" and "rules" in dist.metadata
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(AssetKey("pseudo_labels"), "pseudo_labels_distribution")]
    )
    assert record  # stored in the instance: what the UI shows


def test_item_embedding_check_and_label_audit(world, everything):
    gpl, instance, _, _ = world
    result = _run(everything, gpl, ["item_embeddings", "label_audit"], instance)
    assert result.success
    assert _evaluations(result)["item_embeddings_valid"][None].passed
    meta = instance.fetch_materializations(AssetKey("label_audit"), limit=1).records[0].asset_materialization.metadata
    assert meta["pairs"].value > 0 and 0 <= meta["later_click_rate"].value <= 1
    assert "reliability" in meta and "by_lag" in meta and "plot" in meta
    wh = gpl.warehouse()
    pairs = wh.query("SELECT * FROM label_audit_pairs")
    assert len(pairs) == meta["pairs"].value
    assert (pd.to_datetime(pairs["exposure_day"]) > pd.to_datetime(pairs["label_day"])).all()
    by_day = wh.query("SELECT * FROM label_audit_by_day")
    assert by_day["n"].sum() == len(pairs)


def _corrupt(gpl, day: str, **values) -> None:
    wh = gpl.warehouse()
    sets = ", ".join(f"{col} = {val}" for col, val in values.items())
    with wh.transaction() as con:
        con.execute(f"UPDATE pseudo_labels SET {sets} WHERE day = ?", [date.fromisoformat(day)])


def test_corrupted_partition_fails_its_day_and_blocks_training(world, everything, tmp_path):
    gpl, instance, _, world_dir = world
    # Work on a copy so the other tests keep the healthy warehouse.
    data = tmp_path / "data"
    shutil.copytree(world_dir / "data", data)
    gpl = GplSettings(data_dir=str(data), overrides_json=HISTORY)
    selection = AssetSelection.checks_for_assets("pseudo_labels") | AssetSelection.assets("training_consumer")

    # Healthy days: the checks pass and training runs on them.
    CONSUMED.clear()
    ok = _run(everything, gpl, selection, instance, tags=range_tags("2024-01-03", "2024-01-05"))
    assert ok.success and CONSUMED == [["2024-01-03", "2024-01-04", "2024-01-05"]]

    # Saturate one day: every pseudo-label 1.0 with full confidence.
    _corrupt(gpl, "2024-01-04", pseudo_label=1.0, confidence=1.0)
    CONSUMED.clear()
    bad = _run(everything, gpl, selection, instance, tags=range_tags("2024-01-03", "2024-01-05"), raise_on_error=False)
    assert not bad.success
    assert CONSUMED == []  # training did not run on the range that holds the bad day
    assert not any(e.asset_key == AssetKey("training_consumer") for e in bad.get_asset_materialization_events())
    dist = _evaluations(bad)["pseudo_labels_distribution"]
    # one result per day: only the bad day failed, the others passed, each with its own reasons
    assert {day: ev.passed for day, ev in dist.items()} == {"2024-01-03": True, "2024-01-04": False, "2024-01-05": True}
    assert dist["2024-01-04"].blocking
    assert "pseudo_label_mean: observed 1, expected in [0.01, 0.9]" in dist["2024-01-04"].description
    assert "high_confidence_positive_share" in dist["2024-01-04"].metadata["reason"].value
    assert all(e.passed for e in _evaluations(bad)["pseudo_labels_valid"].values())  # values in range
    failure = bad.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "blocking asset check" in failure and "pseudo_labels_distribution" in failure
    logged = [e.message for e in instance.all_logs(bad.run_id) if e.level >= 40]
    assert any("pseudo-label distribution FAILED on 1 of 3 partition(s): 2024-01-04" in (m or "") for m in logged)
    # The instance keeps the status per partition (what the UI's partition view of the check shows).
    key = AssetCheckKey(AssetKey("pseudo_labels"), "pseudo_labels_distribution")
    status = {
        info.partition_key: info.latest_execution_status.value
        for info in instance.event_log_storage.get_asset_check_partition_info(
            [key], partition_keys=["2024-01-03", "2024-01-04"]
        )
    }
    assert status == {"2024-01-03": "SUCCEEDED", "2024-01-04": "FAILED"}

    # NaN confidence on a single partition: the value check fails too.
    _corrupt(gpl, "2024-01-05", confidence="'NaN'::DOUBLE")
    CONSUMED.clear()
    nan = _run(everything, gpl, selection, instance, partition_key="2024-01-05", raise_on_error=False)
    assert not nan.success and CONSUMED == []
    valid = _evaluations(nan)["pseudo_labels_valid"]["2024-01-05"]
    assert not valid.passed and "confidence_not_null" in valid.description

    # A later run (training in its own run) refuses the failing days through the same suites.
    with pytest.raises(QualityGateError, match=r"2024-01-04: pseudo_label_distribution: pseudo_label_mean"):
        require_label_days(gpl.warehouse(), partition_days(["2024-01-03", "2024-01-04"]))
    require_label_days(gpl.warehouse(), partition_days(["2024-01-02", "2024-01-03"]))

    # Re-materializing the bad days repairs them; the checks pass and training runs.
    CONSUMED.clear()
    fixed = _run(
        everything,
        gpl,
        AssetSelection.assets("pseudo_labels", "training_consumer"),
        instance,
        tags=range_tags("2024-01-04", "2024-01-05"),
    )
    assert fixed.success and CONSUMED == [["2024-01-04", "2024-01-05"]]
    assert all(e.passed for e in fixed.get_asset_check_evaluations())


def test_checks_alone_check_the_days_of_the_run(world, everything):
    """Checks without their asset (the UI's "Execute" on a check, for chosen partitions) check those days."""
    gpl, instance, _, _ = world
    selection = AssetSelection.checks_for_assets("pseudo_labels", "candidate_events")
    ranged = _run(everything, gpl, selection, instance, tags=range_tags("2024-01-02", "2024-01-03"))
    assert ranged.success
    evals = _evaluations(ranged)
    assert sorted(evals["pseudo_labels_distribution"]) == ["2024-01-02", "2024-01-03"]
    assert sorted(evals["candidate_events_contract"]) == ["2024-01-02", "2024-01-03"]
