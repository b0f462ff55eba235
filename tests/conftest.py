"""Shared fixtures (helpers that tests import are in tests/helpers.py). Every test runs in a small simulator world:
its environment is set by a session fixture (restored at the end), never at import; the Dagster definitions are
built from it (``dagster_defs``), not from whatever the environment was when `assets` was imported."""

import subprocess
from pathlib import Path

import pytest

from gpl_platform.config import SHARED_ML100K, Settings, load_settings
from tests.helpers import free_port

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
    # the step budget's validation schedule, shrunk for the tiny worlds (tests check behaviour, not convergence)
    "GPL_TRAINING__EVAL_EVERY_STEPS": "5",
    "GPL_TRAINING__PATIENCE_EVALS": "3",
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


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free port of 127.0.0.1 for the session (CI installs it: .ci/run)."""
    import shutil
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
