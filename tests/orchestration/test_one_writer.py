"""`gpl run` obeys the same one-writer rule as the daemon's runs: while another run holds the
`duckdb_warehouse` pool slot (dagster.yaml: one slot, op granularity), its steps wait; they start only
after that run ended. Ordering from the instance's event log, no timing asserted."""

import signal
import subprocess
import sys

import pytest
from dagster import DagsterEventType, DagsterInstance

from tests.live import instance_home, live_env, run_status, runs, wait_for
from tests.orchestration.test_run_monitoring import STUCK_RUN

pytestmark = pytest.mark.slow


def _step_starts(instance, run_id):
    return [r.timestamp for r in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_START).records]


def test_gpl_run_waits_for_the_warehouse_slot(tmp_path, monkeypatch):
    home, data = instance_home(tmp_path), tmp_path / "data"
    env = live_env(home, data)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    holder = subprocess.Popen(
        [sys.executable, "-c", STUCK_RUN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    gpl = None
    try:
        assert holder.stdout.readline().strip() == "INSIDE"  # its candidate_events step holds the slot
        gpl = subprocess.Popen(
            [sys.executable, "-m", "gpl_platform.cli.main", "run", "--select", "item_catalog"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        with DagsterInstance.get() as instance:
            mine = wait_for(
                "gpl run's run", lambda: [r for r in runs(instance) if r.tags.get("gpl/launched_by") == "gpl run"], 300
            )[0]
            wait_for(
                "gpl run's step to be blocked on the slot",
                lambda: instance.event_log_storage.get_concurrency_info("duckdb_warehouse").pending_step_count >= 1,
                300,
            )
            assert _step_starts(instance, mine.run_id) == []  # waiting, not writing
            holder.send_signal(signal.SIGINT)  # the other writer stops (its run fails, its slot is freed)
            holder.wait(timeout=120)
            wait_for("gpl run to finish", lambda: gpl.poll() is not None, 600)
            assert gpl.returncode == 0, gpl.stdout.read()[-3000:]
            stuck = next(r for r in runs(instance) if r.tags.get("gpl/launched_by") == "test")
            assert run_status(instance, stuck.run_id).value == "FAILURE"
            ended = instance.get_run_record_by_id(stuck.run_id).end_time
            assert min(_step_starts(instance, mine.run_id)) >= ended  # started only after the slot was free
    finally:
        for proc in (holder, gpl):
            if proc is not None and proc.poll() is None:
                proc.kill()
