"""Runs whose process dies never block the queue (a real daemon, dagster.yaml's one-run-at-a-time queue
and its duckdb_warehouse pool).

1. An in-process run (what `gpl run` does) is killed with kill -9 while it holds the warehouse slot:
   it stays STARTED in the instance. A run queued afterwards starts anyway: the dead_run_watchdog
   sensor marks the dead run failed and frees its slot.
2. A queued run launched by the daemon is killed with kill -9 mid-run: it is marked failed and the
   next queued run starts and succeeds.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from dagster import DagsterInstance

from tests.live import Daemon, instance_home, launch, live_env, run_status, runs, wait_for, worker_pid

pytestmark = pytest.mark.slow

# An in-process run of candidate_events against the persistent instance that stops inside the asset.
STUCK_RUN = textwrap.dedent("""
    import time, warnings
    warnings.filterwarnings("ignore")
    from dagster import DagsterInstance, materialize
    from gpl_platform.data import ingestion

    def stuck(*args, **kwargs):
        print("INSIDE", flush=True)
        time.sleep(600)

    ingestion.ingest_event_days = stuck
    from assets.definitions import defs
    with DagsterInstance.get() as instance:
        materialize([*defs.assets, *defs.asset_checks], selection=["candidate_events"], partition_key="2024-01-02",
                    resources=defs.resources, instance=instance, tags={"gpl/launched_by": "test"})
""")


def test_dead_runs_never_block_the_queue(tmp_path, monkeypatch):
    home, data = instance_home(tmp_path), tmp_path / "data"
    env = live_env(home, data, GPL_AUTOMATION__SENSORS_RUNNING="false")  # only the watchdog: no automation runs
    # 1. an in-process run killed while it holds the pool slot
    stuck = subprocess.Popen(
        [sys.executable, "-c", STUCK_RUN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert stuck.stdout.readline().strip() == "INSIDE"
    finally:
        os.killpg(stuck.pid, signal.SIGKILL)
        stuck.wait()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    daemon = Daemon(home, env, tmp_path / "daemon.log")
    try:
        with DagsterInstance.get() as instance:
            [dead] = runs(instance)
            assert run_status(instance, dead.run_id).value == "STARTED"  # what Dagster alone leaves behind
            launch(env, "gpl_catalog")
            launch(env, "gpl_catalog")
            first, second = sorted(
                (r for r in runs(instance) if r.job_name == "gpl_catalog"),
                key=lambda r: instance.get_run_record_by_id(r.run_id).create_timestamp,
            )
            wait_for(
                "the dead in-process run to be marked failed",
                lambda: run_status(instance, dead.run_id).value == "FAILURE",
                240,
                daemon,
            )
            failure = [e.message for e in instance.all_logs(dead.run_id) if "gpl watchdog" in (e.message or "")]
            assert failure, "the watchdog's reason is in the run's log"
            # 2. the first queued run starts (the queue moved on); kill its process mid-run
            pid = wait_for(
                "the first queued run's process",
                lambda: run_status(instance, first.run_id).value == "STARTED" and worker_pid(instance, first.run_id),
                300,
                daemon,
            )
            assert run_status(instance, second.run_id).value == "QUEUED"  # one run at a time
            os.kill(pid, signal.SIGKILL)
            wait_for(
                "the killed run to be marked failed",
                lambda: run_status(instance, first.run_id).value == "FAILURE",
                240,
                daemon,
            )
            wait_for(
                "the next queued run to succeed",
                lambda: run_status(instance, second.run_id).value in ("SUCCESS", "FAILURE"),
                600,
                daemon,
            )
            assert run_status(instance, second.run_id).value == "SUCCESS", daemon.log.read_text()[-3000:]
    finally:
        daemon.stop()
