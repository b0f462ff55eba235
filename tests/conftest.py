"""Shared fixtures. Every test runs in a small simulator world: its environment is set by a
session fixture (restored at the end), never at import; the Dagster definitions are built from it
(``dagster_defs``), not from whatever the environment was when `assets` was imported."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from gpl_platform.config import SHARED_ML100K, Settings, load_settings

TEST_ENV = {
    "GPL_SOURCE": "simulator",
    "GPL_SIMULATOR__N_USERS": "60",
    "GPL_SIMULATOR__N_ITEMS": "300",
    "GPL_SIMULATOR__N_DAYS": "5",
    "GPL_SIMULATOR__CANDIDATES_PER_REQUEST": "20",
    "GPL_SIMULATOR__REQUESTS_PER_USER_PER_DAY": "0.6",
    "GPL_WAREHOUSE_LOCK_TIMEOUT_S": "5",
    # semantic IDs and their generator, sized for the 5-day, 300-item world
    "GPL_SID__SEMANTIC_IDS__WARMUP_EPOCHS": "40",
    "GPL_SID__SEMANTIC_IDS__EPOCHS": "200",
    "GPL_SID__GENERATOR__EPOCHS": "12",
    "GPL_SID__GENERATOR__RETRAIN_EVERY_DAYS": "2",
    "GPL_SID__GENERATOR__MIN_TRAINING_POSITIVES": "30",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
}


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory) -> dict:
    """The small simulator world (the environment of this process and of the subprocesses it starts)."""
    with pytest.MonkeyPatch.context() as patch:
        env = {**TEST_ENV, "GPL_DATA_DIR": str(tmp_path_factory.mktemp("gpl-session") / "data")}
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("GPL_CONTRACT__PATH", raising=False)
        yield env


@pytest.fixture(scope="session")
def dagster_defs():
    """The project's definitions built in the test world (simulator partitions 2024-01-01 .. 05)."""
    from assets.definitions import build_definitions

    return build_definitions()


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Simulator settings (small world) with a warehouse in a fresh temp dir."""
    return load_settings({"data_dir": str(tmp_path / "data")})


@pytest.fixture
def ml100k_dir() -> Path:
    if not SHARED_ML100K.is_dir():
        pytest.fail(f"{SHARED_ML100K} is missing: tests and CI run with ../shared beside the repo")
    return SHARED_ML100K


def tiny_contract_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Three items, two users, two requests on two UTC days; hand-written so tests can break it."""
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["Alpha film", "Beta film", "Gamma film"],
                          "genre": ["x", "y", "x"]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, 40]})
    t1 = pd.Timestamp("2024-03-01T23:59:59Z")
    t2 = pd.Timestamp("2024-03-02T00:00:00Z")
    events = pd.DataFrame({
        "request_id": ["r1", "r1", "r1", "r2", "r2"],
        "user_id": ["u1", "u1", "u1", "u1", "u1"],
        "item_id": ["a", "b", "c", "a", "c"],
        "event_time": [t1, t1, t1, t2, t2],
        "exposed": [True, True, False, True, False],
        "clicked": pd.array([1, 0, None, 1, None], dtype="Int8"),
        "oracle_label": pd.array([1, 0, 1, 1, 0], dtype="Int8"),
    })
    events["event_time"] = events["event_time"].astype("datetime64[us, UTC]")
    return items, users, events


def write_contract_dir(directory: Path, items, users, events, fmt: str = "parquet") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("users", users), ("events", events)):
        if frame is None:
            continue
        if fmt == "parquet":
            frame.to_parquet(directory / f"{name}.parquet", index=False)
        else:
            frame.to_csv(directory / f"{name}.csv", index=False)
    return directory


def hold_duckdb_lock(path, seconds: float) -> subprocess.Popen:
    """Another process that opens the DuckDB file for writing, says so, and holds it for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time
        con = duckdb.connect({str(path)!r})
        print("locked", flush=True)
        time.sleep({seconds})
        con.close()
        print("released", flush=True)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def run_assets(defs, gpl, selection, instance=None, **kwargs):
    """``materialize`` the ``selection`` of ``defs`` (assets and checks) with the resources of ``gpl``."""
    from dagster import DagsterInstance, materialize

    from assets.resources import gpl_resources

    return materialize([*defs.assets, *defs.asset_checks], selection=selection, resources=gpl_resources(gpl),
                       instance=instance or DagsterInstance.ephemeral(), **kwargs)
