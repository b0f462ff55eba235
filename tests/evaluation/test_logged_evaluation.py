"""Evaluation of real logs (no oracle labels): the inverse-propensity estimate against the truth on a
synthetic log, and a contract without oracle labels end to end through `gpl run` (exit 0). And the CLI
as a user meets it: one-line errors with their exit codes, the project's Dagster instance by default."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpl_platform.evaluation.logged import ips_recall_at_k, logged_metrics

ROOT = Path(__file__).resolve().parents[2]


def _synthetic_log(n_requests=4000, n_candidates=20, seed=0):
    """Requests of candidates with a true label, a logging propensity and exposure drawn with it, and a
    score that ranks true positives higher on average."""
    rng = np.random.default_rng(seed)
    n = n_requests * n_candidates
    y = rng.random(n) < 0.15
    propensity = rng.uniform(0.05, 0.9, n)
    exposed = rng.random(n) < propensity
    scores = y * 1.0 + rng.normal(0, 0.9, n)
    requests = np.repeat(np.arange(n_requests), n_candidates)
    return requests, y, propensity, exposed, scores


def _true_recall(requests, y, scores, k):
    frame = pd.DataFrame({"r": requests, "y": y.astype(int), "s": scores}).sort_values(
        ["r", "s"], ascending=[True, False]
    )
    frame["top"] = frame.groupby("r").cumcount() < k
    return frame.loc[frame["top"], "y"].sum() / frame["y"].sum()


def test_ips_recall_estimates_the_true_recall_from_exposed_clicks_only():
    requests, y, propensity, exposed, scores = _synthetic_log()
    truth = _true_recall(requests, y, scores, 10)
    clicked = np.where(exposed, y.astype(float), np.nan)  # unexposed: no label in the log
    estimate = ips_recall_at_k(requests, exposed, clicked, propensity, scores, k=10, clip=1e9)
    naive = _true_recall(requests[exposed], y[exposed], scores[exposed], 10)  # exposed rows only: biased
    assert abs(estimate - truth) < 0.02, (estimate, truth)
    assert abs(naive - truth) > abs(estimate - truth)  # the exposed-only number answers another question
    # Uninformative scores: the estimate falls to about K / candidates.
    random_scores = np.random.default_rng(1).random(len(scores))
    assert abs(ips_recall_at_k(requests, exposed, clicked, propensity, random_scores, 10, 1e9) - 0.5) < 0.03


def test_logged_metrics_use_only_what_logs_have():
    requests, y, propensity, exposed, scores = _synthetic_log(500)
    test = pd.DataFrame(
        {
            "request_id": requests.astype(str),
            "user_id": (requests % 50).astype(str),
            "exposed": exposed,
            "clicked": np.where(exposed, y.astype(float), np.nan),
            "propensity": propensity,
        }
    )
    metrics = logged_metrics(test, scores, propensity_known=True, clip=20.0)
    assert set(metrics) == {"exposed_auc", "exposed_gauc", "exposed_hr@3", "exposed_hr@10", "ips_recall@10"}
    assert 0.7 < metrics["exposed_auc"] < 0.9
    assert np.isnan(logged_metrics(test, scores, propensity_known=False, clip=20.0)["ips_recall@10"])


@pytest.mark.slow
def test_a_contract_without_oracle_labels_runs_end_to_end(tmp_path, settings):
    """Real logs: no oracle_label column, a fifth of the requests served uniformly at random (the exploration
    slice, named in logging_policy). `gpl run` exits 0, the evaluation says what it measured, judges the
    methods on the slice and trains on none of it."""
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir
    from gpl_platform.data.warehouse import Warehouse

    contract = tmp_path / "logs"
    exploring = settings.model_copy(
        update={"simulator": settings.simulator.model_copy(update={"exploration_share": 0.2})}
    )
    export_contract_dir(load_source(exploring), contract)
    events = pd.read_parquet(contract / "events.parquet").drop(columns=["oracle_label", "oracle_probability"])
    events.to_parquet(contract / "events.parquet", index=False)
    home = tmp_path / "dagster_home"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GPL_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
        "GPL_ANCHORS__BACKEND": "history",
        "GPL_CALIBRATION__MIN_SAMPLES": "50",
        "GPL_TRAINING__SEEDS": "[0]",
        "GPL_TRAINING__EPOCHS": "3",
        "GPL_TRAINING__TEST_SHARE": "0.15",
        "GPL_TRAINING__VALID_SHARE": "0.15",
    }
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpl_platform.cli.main",
            "run",
            "--source",
            "contract",
            "--path",
            str(contract),
            "--allow-failed-checks",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Logged-data evaluation (no oracle labels" in out.stdout
    report = json.loads((tmp_path / "data" / "reports" / "logged_eval.json").read_text())
    assert report["kind"] == "logged" and report["propensities"] == "logged"
    assert {"exposed_only", "gpl", "ips"} <= set(report["methods"])
    for method, metrics in report["methods"].items():
        assert 0 <= metrics["exposed_auc"]["mean"] <= 1, method
        assert 0 <= metrics["ips_recall@10"]["mean"] <= 1, method
    assert "pairs" in report["label_audit"]  # next to the label audit
    slice_ = report["exploration"]
    assert slice_["requests"] > 0 and slice_["shown"] > 0 and slice_["training_rows_held_out"] > 0
    for method, metrics in slice_["methods"].items():
        for name in ("gauc", "auc", "hr@10"):
            entry = metrics[name]
            assert 0 <= entry["mean"] <= 1 and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1], (method, name)
    assert {c["against"] for c in slice_["comparisons"]} >= {"exposed_only", "ips"}
    assert slice_["label_audit"]["rows"] > 0 and 0 <= slice_["label_audit"]["mean_pool_auc"] <= 1
    assert 0 < slice_["label_audit"]["mean_pool_mean_label"] < 1
    markdown = (tmp_path / "data" / "reports" / "logged_eval.md").read_text()
    slice_part = markdown.split("## The exploration slice", 1)[1].split("\n## ", 1)[0]
    assert "exploration test requests" in slice_part and "| gpl " in slice_part  # the slice's own table
    with Warehouse(tmp_path / "data" / "warehouse.duckdb").connect(read_only=True) as con:
        trained_on_slice = con.execute(
            "SELECT count(*) FROM training_set t JOIN events e USING (day, request_id, item_id) "
            "WHERE e.logging_policy = 'uniform_random'"
        ).fetchone()[0]
        slice_rows = con.execute("SELECT count(*) FROM events WHERE logging_policy = 'uniform_random'").fetchone()[0]
    assert slice_rows > 0 and trained_on_slice == 0
    assert not (tmp_path / "data" / "reports" / "offline_eval.json").exists()  # no oracle, no oracle report


def test_one_line_errors_and_exit_codes(tmp_path):
    """A bad contract directory (no items, a clock error, a nested folder), a reversed range, a partition that
    does not exist, a wrong source: one line each, non-zero exit; --debug shows the traceback."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "GPL_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
    }
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())

    def gpl(*args):
        return subprocess.run(
            [sys.executable, "-m", "gpl_platform.cli.main", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    from tests.helpers import tiny_contract_tables, write_contract_dir

    items, users, events = tiny_contract_tables()
    events.loc[events["request_id"] == "r2", "event_time"] = pd.Timestamp("1970-01-01T00:00:00Z")  # a clock error
    clock = write_contract_dir(tmp_path / "clock", items, users, events)
    nested = write_contract_dir(tmp_path / "nested", items, users, None)
    (nested / "events" / "day=2024-03-01" / "retry").mkdir(parents=True)
    for args, code, fragment in [
        (["run", "--source", "contract", "--path", str(empty)], 1, "has no 'items' table"),
        (["run", "--source", "contract", "--path", str(clock)], 1, "2 row(s) lie outside the plausible window"),
        (["run", "--source", "contract", "--path", str(nested)], 1, "day=2024-03-01/retry: is a folder inside"),
        (["run", "--start", "2024-01-04", "--end", "2024-01-02"], 1, "--start 2024-01-04 is after --end 2024-01-02"),
        (["run", "--start", "1999-01-01"], 1, "--start 1999-01-01 is not a partition"),
        (["run", "--source", "movielens"], 2, "--source must be one of"),
    ]:
        out = gpl(*args)
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        assert out.returncode == code, (args, out.stdout[-2000:], out.stderr[-2000:])
        # The error is the last line; before it only log lines (a failing step: one line each, no traceback).
        assert fragment in lines[-1], (args, out.stderr[-2000:])
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line) for line in lines[:-1]), lines
        assert "Traceback" not in out.stderr and "Stack Trace" not in out.stderr
    debug = gpl("run", "--start", "2024-01-04", "--end", "2024-01-02", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    debug = gpl("run", "--source", "contract", "--path", str(clock), "--debug")  # a step's error in full
    assert debug.returncode == 1 and "Stack Trace" in debug.stderr and "in check_event_times" in debug.stderr
