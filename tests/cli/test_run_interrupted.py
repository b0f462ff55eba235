"""`gpl run` stopped before Dagster started its run leaves no unfinished run behind (a real `gpl run` on the
small simulator world, a temp instance). The signal is sent as soon as the run record exists (NOT_STARTED:
Dagster is still creating it, writing its planned asset events), where Dagster does not catch interrupts.

- Ctrl-C (SIGINT) or SIGTERM: `gpl run` marks the run failed itself, frees its pool slots, exits 130 and names it.
- kill -9: the process cannot clean up; the watchdog (at the next `gpl run`, or the daemon's sensor) fails the
  NOT_STARTED run by its `gpl/pid` tag.
"""

import signal
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from assets import run_health
from tests.live import ROOT, instance_home, live_env, run_status, runs, wait_for

UNFINISHED = {"NOT_STARTED", "QUEUED", "STARTING", "STARTED"}


def _signal_when_created(tmp_path, monkeypatch, sig: int) -> tuple[subprocess.Popen, str, DagsterInstance]:
    """A `gpl run` of the catalog roots, sent ``sig`` the moment its run record appears; (process, run id, instance)."""
    home = instance_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    gpl = subprocess.Popen(
        [sys.executable, "-m", "gpl_platform.cli.main", "run", "--select", "item_catalog", "--select", "users"],
        env=live_env(home, tmp_path / "data"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    instance = DagsterInstance.get()
    try:

        def created():
            assert gpl.poll() is None, f"gpl run ended before creating its run:\n{gpl.stderr.read()[-3000:]}"
            return runs(instance)

        [run] = wait_for("gpl run to create its run", created, 600, every=0.005)
        gpl.send_signal(sig)
        # Polled fast, the run is seen while Dagster creates it: the window this test is about.
        assert run.status == DagsterRunStatus.NOT_STARTED, run.status
    except BaseException:
        gpl.kill()
        gpl.communicate()
        instance.dispose()
        raise
    return gpl, run.run_id, instance


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_before_the_run_started_marks_it_failed(tmp_path, monkeypatch, sig):
    gpl, run_id, instance = _signal_when_created(tmp_path, monkeypatch, sig)
    with instance:
        try:
            out, err = gpl.communicate(timeout=300)
        finally:
            if gpl.poll() is None:
                gpl.kill()
        assert gpl.returncode == 130, err[-3000:]
        left = [(r.run_id, r.status.value) for r in runs(instance) if r.status.value in UNFINISHED]
        assert left == [], left
        last = err.strip().splitlines()[-1]
        assert last == f"interrupted: run(s) {run_id} marked failed in the Dagster instance; re-run to finish", last
        assert "Traceback" not in err
        assert run_status(instance, run_id) == DagsterRunStatus.FAILURE
        assert any("interrupted" in (e.message or "") for e in instance.all_logs(run_id))  # the reason, in its log
        pool = instance.event_log_storage.get_concurrency_info("duckdb_warehouse")
        assert run_id not in {s.run_id for s in pool.claimed_slots} | {s.run_id for s in pool.pending_steps}


def test_a_run_killed_before_it_started_is_failed_by_the_watchdog(tmp_path, monkeypatch):
    gpl, run_id, instance = _signal_when_created(tmp_path, monkeypatch, signal.SIGKILL)
    with instance:
        gpl.communicate(timeout=60)
        assert run_status(instance, run_id) == DagsterRunStatus.NOT_STARTED  # what Dagster alone leaves behind
        monkeypatch.setattr(run_health, "NOT_STARTED_SLACK_S", 0.0)  # not wait for the slack to pass
        assert run_health.fail_dead_runs(instance) == [run_id]
        assert run_status(instance, run_id) == DagsterRunStatus.FAILURE
        assert any(f"(pid {gpl.pid}) is gone" in (e.message or "") for e in instance.all_logs(run_id))
