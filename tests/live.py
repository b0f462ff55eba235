"""Helpers for the tests that run a real Dagster daemon against a temp instance: start and stop it,
wait (bounded) for runs and materializations, deliver contract days."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, RunsFilter

from tests.processes import stop_process_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def instance_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    (home / "tmp").mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def live_env(home: Path, data: Path, **settings: str) -> dict:
    env = os.environ.copy()
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "GPL_DATA_DIR": str(data),
            "TMPDIR": str(home / "tmp"),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "GPL_AUTOMATION__WATCHDOG_INTERVAL_S": "5",
            "GPL_AUTOMATION__SENSOR_INTERVAL_S": "5",
            "GPL_AUTOMATION__AUTOMATION_INTERVAL_S": "5",
            **settings,
        }
    )
    return env


def _die_with_the_test() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (PR_SET_PDEATHSIG), so a
    daemon never outlives a killed pytest (it is in its own process group, which Ctrl-C does not reach)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Daemon:
    """`dagster-daemon run -m assets.definitions` (its own code server, the default run launcher) in its own
    process group; stop() ends the group."""

    def __init__(self, home: Path, env: dict, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-m", "assets.definitions", "-d", str(ROOT)],
                env=env,
                cwd=home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_the_test,
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=60, kill_leftovers=True)  # run workers or a code server left


def wait_for(
    what: str, condition: Callable[[], object], timeout: float, daemon: Daemon | None = None, every: float = 2.0
):
    """Poll ``condition`` until it returns something truthy (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None:
            daemon.check_alive()
        value = condition()
        if value:
            return value
        time.sleep(every)
    tail = daemon.log.read_text()[-4000:] if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def runs(instance: DagsterInstance, **filters) -> list:
    return [r.dagster_run for r in instance.get_run_records(filters=RunsFilter(**filters))]


def run_status(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    return instance.get_run_by_id(run_id).status


def finished(instance: DagsterInstance, run_ids) -> bool:
    return all(run_status(instance, r).value in ("SUCCESS", "FAILURE", "CANCELED") for r in run_ids)


def worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_START, limit=1).records
    return records[0].event_log_entry.dagster_event.pid if records else None


def materializations(instance: DagsterInstance, asset: str, partition: str | None = None) -> list:
    return list(
        instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None),
            limit=100,
        ).records
    )


def launch(env: dict, job: str, tags: dict | None = None) -> None:
    """Submit a run to the instance's queue with Dagster's own CLI (`dagster job launch`)."""
    command = [str(BIN / "dagster"), "job", "launch", "-m", "assets.definitions", "-d", str(ROOT), "-j", job]
    if tags:
        command += ["--tags", json.dumps(tags)]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
