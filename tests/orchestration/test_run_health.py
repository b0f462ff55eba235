"""The run cleanups of assets/run_health.py on a real (temp, SQLite) instance, with runs created through the
instance: the runs an interrupted `gpl run` created (`fail_unfinished_runs`), and NOT_STARTED runs of a
`gpl run` process that is gone (`fail_dead_runs`, by the `gpl/pid` and `gpl/host` tags)."""

import os
import socket
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus, job, op

from assets import run_health

POOL = "duckdb_warehouse"


@op
def noop():
    pass


@job
def tiny():
    noop()


@pytest.fixture
def instance(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 1)
        yield instance


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_fail_unfinished_runs_fails_a_not_started_run_and_frees_its_slot(instance):
    planned = instance.create_run_for_job(tiny)  # NOT_STARTED, as while Dagster plans the run
    done = instance.create_run_for_job(tiny, status=DagsterRunStatus.SUCCESS)
    assert instance.event_log_storage.claim_concurrency_slot(POOL, planned.run_id, "noop").is_claimed
    failed = run_health.fail_unfinished_runs(instance, [planned.run_id, done.run_id, "no-such-run"], "interrupted")
    assert failed == [planned.run_id]
    assert instance.get_run_by_id(planned.run_id).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(done.run_id).status == DagsterRunStatus.SUCCESS  # finished runs stay as they are
    assert instance.event_log_storage.get_concurrency_info(POOL).claimed_slots == []
    assert any(e.message == "interrupted" for e in instance.all_logs(planned.run_id))


def test_the_watchdog_fails_a_not_started_run_whose_process_is_gone(instance, monkeypatch):
    here, dead = socket.gethostname(), str(_dead_pid())
    orphan = instance.create_run_for_job(tiny, tags={"gpl/pid": dead, "gpl/host": here})
    alive = instance.create_run_for_job(tiny, tags={"gpl/pid": str(os.getpid()), "gpl/host": here})
    elsewhere = instance.create_run_for_job(tiny, tags={"gpl/pid": dead, "gpl/host": f"not-{here}"})
    untagged = instance.create_run_for_job(tiny)
    assert run_health.fail_dead_runs(instance) == []  # younger than the slack: it may be about to be queued
    monkeypatch.setattr(run_health, "NOT_STARTED_SLACK_S", 0.0)
    assert run_health.fail_dead_runs(instance) == [orphan.run_id]
    status = {r: instance.get_run_by_id(r).status for r in (orphan.run_id, alive.run_id, elsewhere.run_id)}
    assert status == {
        orphan.run_id: DagsterRunStatus.FAILURE,
        alive.run_id: DagsterRunStatus.NOT_STARTED,  # its process is running (this one)
        elsewhere.run_id: DagsterRunStatus.NOT_STARTED,  # another machine's process: cannot be checked here
    }
    assert instance.get_run_by_id(untagged.run_id).status == DagsterRunStatus.NOT_STARTED  # not a `gpl run` run
