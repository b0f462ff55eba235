"""What tests share besides fixtures (those are in tests/conftest.py): hand-written contract tables,
processes that hold the DuckDB lock, in-process Dagster runs, a small trained pre-ranker. What the
benchmarks use too (a complete small feature store, random item vectors, servers on a free port) lives
in bench/_support.py, re-exported here: the benchmarks do not import the tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from bench._support import RandomEncoder, RunningServer, build_feature_world, free_port

__all__ = [
    "RandomEncoder",
    "RunningServer",
    "bench_module",
    "build_feature_world",
    "exposed_training_rows",
    "free_port",
    "hold_duckdb_lock",
    "post_json",
    "run_assets",
    "tiny_contract_tables",
    "tiny_sweep_overrides",
    "train_small_model",
    "write_contract_dir",
]


def tiny_contract_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Three items, two users, two requests on two UTC days; hand-written so tests can break it."""
    items = pd.DataFrame(
        {"item_id": ["a", "b", "c"], "text": ["Alpha film", "Beta film", "Gamma film"], "genre": ["x", "y", "x"]}
    )
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, 40]})
    t1 = pd.Timestamp("2024-03-01T23:59:59Z")
    t2 = pd.Timestamp("2024-03-02T00:00:00Z")
    events = pd.DataFrame(
        {
            "request_id": ["r1", "r1", "r1", "r2", "r2"],
            "user_id": ["u1", "u1", "u1", "u1", "u1"],
            "item_id": ["a", "b", "c", "a", "c"],
            "event_time": [t1, t1, t1, t2, t2],
            "exposed": [True, True, False, True, False],
            "clicked": pd.array([1, 0, None, 1, None], dtype="Int8"),
            "oracle_label": pd.array([1, 0, 1, 1, 0], dtype="Int8"),
        }
    )
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
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import duckdb, time
        con = duckdb.connect({str(path)!r})
        print("locked", flush=True)
        time.sleep({seconds})
        con.close()
        print("released", flush=True)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def run_assets(defs, gpl, selection, instance=None, **kwargs):
    """``materialize`` the ``selection`` of ``defs`` (assets and checks) with the resources of ``gpl``."""
    from dagster import DagsterInstance, materialize

    from assets.resources import gpl_resources

    return materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        resources=gpl_resources(gpl),
        instance=instance or DagsterInstance.ephemeral(),
        **kwargs,
    )


def bench_module(name: str):
    """A benchmark script of bench/ loaded as a module (as `gpl bench` loads it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sweep_overrides() -> dict:
    """Settings that let a bias-sweep setting run end to end in the tests' 5-day world (a new dict each call):
    history anchors (no LLM or generator to train), a calibration from day 2 on at 10% exposure, and the gate's
    confidence quantile ranges opened. A 5-day world's confidences sit at the edge of those ranges: a refused
    day would leave GPL no pseudo-labelled training day (skipped, not compared); the gate has its own tests."""
    return {
        "anchors": {"backend": "history"},
        "calibration": {"min_samples": 8},
        "quality": {"pseudo_labels": {"confidence_quantile_ranges": [[0, 1], [0, 1], [0, 1]]}},
    }


def labelled_world(data_dir: Path, overrides: dict):
    """A simulator world with ``overrides`` materialized up to the pseudo-labels and features (no training or
    evaluation asset), ephemeral Dagster instance: returns its settings (the evaluations run on it in tests)."""
    import json

    from assets.graph import build_definitions
    from assets.resources import GplSettings
    from assets.runner import run_pipeline

    gpl = GplSettings(data_dir=str(data_dir), overrides_json=json.dumps(overrides))
    skip = {"offline_evaluation", "prerank_model", "training_set", "label_audit"}
    keys = [k.to_user_string() for k in build_definitions().resolve_all_asset_keys()]
    assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=[k for k in keys if k not in skip]).success
    return gpl.settings()


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


def exposed_training_rows(world, service: str = "prerank_v2"):
    """A feature world's exposed candidates as training rows (their clicks, weight 1), with the feature
    columns and the candidates."""
    from gpl_platform.prerank.data import attach_features, load_candidates
    from gpl_platform.prerank.train import TrainingRows

    cands = load_candidates(world["warehouse"], world["days"])
    cands = cands[cands["exposed"]].reset_index(drop=True)
    matrix, columns = attach_features(world["store"], cands, service)
    labels = cands["clicked"].to_numpy(np.float32)
    rows = TrainingRows(
        matrix,
        labels,
        np.ones(len(labels), np.float32),
        np.zeros(len(labels), bool),
        cands["user_id"].to_numpy(),
        cands["item_id"].to_numpy(),
    )
    return rows, columns, cands


def train_small_model(world, shape: str, seed: int = 0, out=None):
    """A pre-ranker of ``shape`` after two epochs on a feature world's exposed candidates (scores need
    not be good, only the same everywhere), saved under the world's models directory."""
    from gpl_platform.prerank.model import ModelConfig
    from gpl_platform.prerank.train import TrainConfig, train_preranker

    rows, columns, cands = exposed_training_rows(world)
    users = world["dataset"].users["user_id"].tolist()
    items = world["dataset"].items["item_id"].tolist()
    model, _ = train_preranker(
        rows,
        columns,
        rows.matrix[:200],
        rows.labels[:200].astype(int),
        ModelConfig(shape=shape),
        TrainConfig(budget="epochs", epochs=2, seed=seed),
        valid_user_ids=cands["user_id"][:200].to_numpy(),
        valid_item_ids=cands["item_id"][:200].to_numpy(),
        user_vocab=users[:-3],
        item_vocab=items[:-5],
    )  # some catalog ids outside the vocabulary
    out = out or world["store"].settings.artifacts_dir / "models" / f"{shape}-{seed}"
    model.save(out, {"feature_service": "prerank_v2", "version": f"{shape}-{seed}"})
    return model, out
