"""A snapshot of the code location: asset keys with their group, partitioning, upstream assets and
automation, the asset checks, jobs, schedules and sensors. A change here is a change of the product
a user sees in the UI: update the snapshot on purpose, not by accident. And: only public Dagster APIs."""

import re
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from dagster import AssetKey

from assets.definitions import build_definitions
from gpl_platform.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
FOLLOW = "eager"
# key: (group, partitioned, upstream assets, automation condition)
ASSETS = {
    "item_catalog": ("ingestion", False, [], None),
    "users": ("ingestion", False, ["item_catalog"], "eager"),
    "candidate_events": ("ingestion", True, ["item_catalog", "users"], None),
    "user_histories": ("ingestion", True, ["candidate_events"], FOLLOW),
    "item_embeddings": ("gpl", False, ["item_catalog"], "eager"),
    "user_anchors": ("gpl", True, ["item_catalog", "user_histories"], FOLLOW),
    "anchor_embeddings": ("gpl", True, ["user_anchors"], FOLLOW),
    "candidate_similarities": ("gpl", True, ["anchor_embeddings", "candidate_events", "item_embeddings"], FOLLOW),
    "similarity_calibration": ("gpl", True, ["candidate_similarities"], FOLLOW),
    "pseudo_labels": ("gpl", True, ["candidate_similarities", "similarity_calibration"], FOLLOW),
    "item_semantic_ids": ("gpl", False, ["item_embeddings"], "eager"),
    "sid_generator": ("gpl", True, ["candidate_events", "item_semantic_ids"], FOLLOW),
    "history_anchor_pseudo_labels": (
        "gpl_ablation",
        True,
        ["candidate_events", "item_embeddings", "user_histories"],
        FOLLOW,
    ),
    "sid_anchor_pseudo_labels": (
        "gpl_ablation",
        True,
        ["candidate_events", "item_embeddings", "item_semantic_ids", "sid_generator", "user_histories"],
        FOLLOW,
    ),
    "profile_features": ("features", False, ["item_catalog", "item_embeddings", "users"], "eager"),
    "feast_registry": ("features", False, ["item_catalog", "users"], "eager"),
    "user_features": ("features", True, ["candidate_events", "item_embeddings", "users"], FOLLOW),
    "item_features": ("features", True, ["candidate_events", "item_catalog"], FOLLOW),
    "online_features": (
        "features",
        True,
        ["feast_registry", "item_features", "profile_features", "user_features"],
        FOLLOW,
    ),
    "training_set": ("training", False, ["candidate_events", "pseudo_labels"], "on 0 3 * * 1 (UTC) after new data"),
    "prerank_model": (
        "training",
        False,
        ["feast_registry", "item_features", "profile_features", "training_set", "user_features"],
        "after training_set",
    ),
    "offline_evaluation": (
        "training",
        False,
        [
            "feast_registry",
            "history_anchor_pseudo_labels",
            "item_features",
            "prerank_model",
            "profile_features",
            "pseudo_labels",
            "sid_anchor_pseudo_labels",
            "user_features",
        ],
        "after prerank_model",
    ),
    "label_audit": ("quality", False, ["candidate_events", "pseudo_labels"], "on 0 4 * * * (UTC) after new data"),
}
# (asset, check): (blocking, partitioned); every check runs "with its asset" under automation
CHECKS = {
    ("pseudo_labels", "pseudo_labels_valid"): (True, True),
    ("pseudo_labels", "pseudo_labels_distribution"): (True, True),
    ("user_anchors", "user_anchors_quality"): (False, True),
    ("anchor_embeddings", "anchor_embeddings_valid"): (False, True),
    ("candidate_events", "candidate_events_contract"): (False, True),
    ("item_embeddings", "item_embeddings_valid"): (False, False),
}
JOBS = {"gpl_daily", "gpl_catalog"}
SCHEDULES = {"gpl_daily_schedule": ("gpl_daily", "0 2 * * *")}
SENSORS = {"new_contract_days", "dead_run_watchdog", "gpl_automation"}


def test_asset_graph_snapshot(dagster_defs):
    graph = dagster_defs.resolve_asset_graph()
    seen = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        condition = node.automation_condition
        seen[key.to_user_string()] = (
            node.group_name,
            node.partitions_def is not None,
            sorted(p.to_user_string() for p in node.parent_keys),
            condition.get_label() if condition else None,
        )
    assert seen == ASSETS


def test_every_asset_documented_and_in_the_warehouse_pool(dagster_defs):
    for assets_def in dagster_defs.assets:
        for spec in assets_def.specs:
            assert spec.description and len(spec.description) > 40, spec.key  # the docstring
        assert assets_def.op.pool == "duckdb_warehouse", assets_def.keys  # one writer at a time
    for checks_def in dagster_defs.asset_checks:
        assert checks_def.op.pool == "duckdb_warehouse"


def test_checks_jobs_schedules_sensors_snapshot(dagster_defs):
    graph = dagster_defs.resolve_asset_graph()
    checks = {}
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        checks[(key.asset_key.to_user_string(), key.name)] = (spec.blocking, spec.partitions_def is not None)
        assert spec.automation_condition.get_label() == "with its asset", key
    assert checks == CHECKS
    repo = dagster_defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs() if not j.name.startswith("__")} == JOBS
    assert {s.name: (s.job_name, s.cron_schedule) for s in repo.schedule_defs} == SCHEDULES
    assert {s.name for s in repo.sensor_defs} == SENSORS
    daily = dagster_defs.resolve_job_def("gpl_daily")
    assert {k.to_user_string() for k in daily.asset_layer.executable_asset_keys} == {
        k for k, v in ASSETS.items() if v[1]
    }


def test_no_private_dagster_imports():
    """Only Dagster's public API: no `dagster._...` module anywhere in the project's code."""
    pattern = re.compile(r"^\s*(from|import)\s+dagster\._|dagster\._[a-z]", re.MULTILINE)
    offenders = []
    for folder in ("assets", "gpl_platform", "tests", "bench", "feature_repo"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for match in pattern.finditer(text):
                line = text[: match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, offenders


def test_building_reads_no_data(tmp_path, monkeypatch):
    """The partitions of a contract source come from its layout, not its rows: an unreadable events file
    (garbage bytes named .parquet inside a day folder) does not stop the definitions from loading."""
    (tmp_path / "events" / "day=2024-03-01").mkdir(parents=True)
    (tmp_path / "events" / "day=2024-03-01" / "part.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "items.parquet").write_bytes(b"nor this")
    defs = build_definitions(load_settings({"source": "contract", "contract": {"path": str(tmp_path)}}))
    keys = defs.resolve_job_def("gpl_daily").partitions_def.get_partition_keys()
    assert keys[0] == "2024-03-01" and len(keys) > 200  # open-ended: up to the current UTC day


@pytest.mark.slow
def test_code_location_loads_in_a_subprocess_with_a_contract_source(tmp_path):
    """What `dagster dev -m assets.definitions` does, with GPL_SOURCE=contract: it loads, fast enough to not
    read the data (measured at two sizes in docs/OPERATIONS.md; no timing asserted here)."""
    (tmp_path / "events" / "day=2024-03-01").mkdir(parents=True)
    env = {"GPL_SOURCE": "contract", "GPL_CONTRACT__PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    import os

    began = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", "from assets.definitions import defs; print(len(list(defs.assets)))"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(ASSETS))
    print(f"code location loaded in {time.monotonic() - began:.1f}s")


@pytest.mark.parametrize("window_days, refit_every_days", [(7, 3), (40, 7)])
def test_the_calibration_depends_on_the_window_its_settings_read(window_days, refit_every_days):
    """similarity_calibration of a day depends on the similarities of every day its fit may read: the
    calibration.window_days before its refit day, which is up to refit_every_days - 1 days before the day."""
    settings = load_settings(
        {
            "simulator": {"n_days": 60},
            "calibration": {"window_days": window_days, "refit_every_days": refit_every_days},
        }
    )
    defs = build_definitions(settings)
    calibration = next(a for a in defs.assets if AssetKey("similarity_calibration") in a.keys)
    mapping = calibration.get_partition_mapping(AssetKey("candidate_similarities"))
    partitions = calibration.partitions_def
    day = date(2024, 2, 29)  # late enough that the whole window exists
    upstream = mapping.get_upstream_mapped_partitions_result_for_partitions(
        partitions.subset_with_partition_keys([day.isoformat()]), partitions, partitions
    ).partitions_subset.get_partition_keys()
    lookback = window_days + refit_every_days - 1
    assert sorted(upstream) == [(day - timedelta(days=n)).isoformat() for n in range(lookback, 0, -1)]
