"""`gpl run` as a user meets it on small data: exit 3 when blocking checks refused days (0 with
--allow-failed-checks, 0 when nothing was refused), and small but valid contracts either run or say in
one line what is too small."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
GPL_UP_TO_LABELS = [
    "item_catalog",
    "users",
    "item_embeddings",
    "candidate_events",
    "user_histories",
    "user_anchors",
    "anchor_embeddings",
    "candidate_similarities",
    "similarity_calibration",
    "pseudo_labels",
]
REFUSED_LINE = "day(s) refused by blocking checks: exit 3"

pytestmark = pytest.mark.slow  # the real encoder, in `gpl run` subprocesses


def _instance(tmp_path: Path, **settings: str) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GPL_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
        "GPL_ANCHORS__BACKEND": "history",
        "GPL_CALIBRATION__MIN_SAMPLES": "50",
        **settings,
    }


def _gpl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpl_platform.cli.main", "run", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _selection(keys: list[str]) -> list[str]:
    return [arg for key in keys for arg in ("--select", key)]


def test_blocking_check_refusals_exit_3_unless_allowed(tmp_path):
    """The 5-day simulator world up to pseudo_labels, with a pseudo-label gate no labelled day can pass (mean at
    most 0): the blocking check refuses every labelled day and `gpl run` exits 3; re-running the labels with
    --allow-failed-checks exits 0; with the default gate, nothing is refused and it exits 0 without the flag."""
    strict = _instance(tmp_path, GPL_QUALITY__PSEUDO_LABELS__PSEUDO_LABEL_MEAN_MAX="0")
    refused = _gpl(strict, *_selection(GPL_UP_TO_LABELS))
    assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert REFUSED_LINE in last and "--allow-failed-checks" in last, last
    n_refused = int(last.split()[0])
    assert 1 <= n_refused <= 5
    # The run summary names the blocking check and the days it refused.
    assert f"pseudo_labels.pseudo_labels_distribution on {n_refused} day(s): 2024-01-0" in refused.stdout, (
        refused.stdout[-3000:]
    )
    assert "Traceback" not in refused.stderr

    allowed = _gpl(strict, "--select", "pseudo_labels", "--allow-failed-checks")
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert f"pseudo_labels.pseudo_labels_distribution on {n_refused} day(s)" in allowed.stdout  # still reported
    assert REFUSED_LINE not in allowed.stderr

    healthy = _gpl({**strict, "GPL_QUALITY__PSEUDO_LABELS__PSEUDO_LABEL_MEAN_MAX": "0.9"}, "--select", "pseudo_labels")
    assert healthy.returncode == 0, healthy.stdout[-3000:] + healthy.stderr[-3000:]
    assert "pseudo_labels_distribution" not in healthy.stdout and REFUSED_LINE not in healthy.stderr


def _logged_contract(directory: Path, n_days: int) -> Path:
    """The simulator world over ``n_days`` days as a contract directory without oracle labels (real logs)."""
    from gpl_platform.config import load_settings
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir

    export_contract_dir(load_source(load_settings({"simulator": {"n_days": n_days}})), directory)
    events = pd.read_parquet(directory / "events.parquet").drop(columns=["oracle_label", "oracle_probability"])
    events.to_parquet(directory / "events.parquet", index=False)
    return directory


def test_a_contract_too_small_for_a_time_split_says_so_in_one_line(tmp_path):
    """Two valid days of logs: every per-day asset runs, then training says in one line that a time split needs
    three days (exit 1, no traceback). Five days run end to end (test_logged_evaluation.py)."""
    contract = _logged_contract(tmp_path / "logs", n_days=2)
    out = _gpl(
        _instance(tmp_path, GPL_TRAINING__SEEDS="[0]", GPL_TRAINING__EPOCHS="1"),
        "--source",
        "contract",
        "--path",
        str(contract),
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ") and "a time split needs at least 3 days with requests, the warehouse has 2" in last
    ), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Stack Trace" not in out.stderr
