"""Shared fixtures. Every test runs in a small simulator world: its environment is set by a
session fixture (restored at the end), never at import; the Dagster definitions are built from it
(``dagster_defs``), not from whatever the environment was when `assets` was imported."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free port of 127.0.0.1 for the session (CI installs it: .ci/run)."""
    import shutil
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


class RunningServer:
    """A server subprocess (its own process group) that answers ``ready_url``; stopped with SIGTERM."""

    def __init__(self, args, ready_url: str, env: dict | None = None, timeout_s: float = 120):
        import time
        import urllib.request

        self.proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=5).read()
                return
            except OSError as exc:
                if getattr(exc, "code", None) is not None:  # an HTTP error status: it is up
                    return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{args[0]} exited: {self.proc.stderr.read().decode()[-3000:]}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        from tests.processes import stop_process_group

        stop_process_group(self.proc, grace_s=20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def post_json(url: str, body, timeout: float = 30) -> tuple[int, dict]:
    """POST a JSON body (or raw bytes); returns (status, parsed JSON answer) for 2xx and 4xx/5xx alike."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def train_small_model(world, shape: str, seed: int = 0, out=None):
    """A pre-ranker of ``shape`` after two epochs on a feature world's exposed candidates (scores need
    not be good, only the same everywhere), saved under the world's models directory."""
    from gpl_platform.prerank.data import attach_features, load_candidates
    from gpl_platform.prerank.model import ModelConfig
    from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_preranker

    store = world["store"]
    cands = load_candidates(world["warehouse"], world["days"])
    cands = cands[cands["exposed"]].reset_index(drop=True)
    matrix, columns = attach_features(store, cands, "prerank_v2")
    labels = cands["clicked"].to_numpy(np.float32)
    users = world["dataset"].users["user_id"].tolist()
    items = world["dataset"].items["item_id"].tolist()
    model, _ = train_preranker(
        TrainingRows(matrix, labels, np.ones(len(labels), np.float32), np.zeros(len(labels), bool),
                     cands["user_id"].to_numpy(), cands["item_id"].to_numpy()),
        columns, matrix[:200], labels[:200].astype(int), ModelConfig(shape=shape), TrainConfig(epochs=2, seed=seed),
        valid_user_ids=cands["user_id"][:200].to_numpy(), valid_item_ids=cands["item_id"][:200].to_numpy(),
        user_vocab=users[:-3], item_vocab=items[:-5])  # some catalog ids outside the vocabulary
    out = out or world["store"].settings.artifacts_dir / "models" / f"{shape}-{seed}"
    model.save(out, {"feature_service": "prerank_v2", "version": f"{shape}-{seed}"})
    return model, out
