"""Runs whose process died (kill -9, OOM, a crashed machine) stay STARTED for ever in Dagster's run
storage: with ``max_concurrent_runs: 1`` the queue then never starts another run, and the dead run's
slot of the ``duckdb_warehouse`` pool is never given back.

Dagster's own run monitoring covers runs that never start (``start_timeout_seconds``) and, through
the code server, runs it launched itself. It cannot see an in-process run (``gpl run``) or a run
whose code server died with it. This watchdog covers those: a STARTED run whose worker process (the
pid of its RUN_START event, on this machine: runs here use the default run launcher or run in
process) no longer exists, or is a different process that reused the pid, is marked failed and its
pool slots are freed; so is a NOT_STARTED run of ``gpl run`` on this machine (tags ``gpl/pid`` and
``gpl/host``) whose process died before Dagster started the run (killed while it planned). The
``dead_run_watchdog`` sensor runs it under the daemon; ``gpl run`` runs it before it starts, and on
Ctrl-C or SIGTERM fails the runs it created that had not finished (:func:`fail_unfinished_runs`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

log = logging.getLogger(__name__)
START_SLACK_S = 2.0  # the run's start time is recorded a moment after its process began
#: a younger NOT_STARTED run is left alone: a run re-executed from the UI copies its parent's tags (the
#: gpl/pid of a process long gone) and is NOT_STARTED for the moment before it is queued
NOT_STARTED_SLACK_S = 10.0
PID_TAG, HOST_TAG = "gpl/pid", "gpl/host"
UNFINISHED = (
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
)


def _worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_START, limit=1).records
    if not records or records[0].event_log_entry.dagster_event is None:
        return None
    return records[0].event_log_entry.dagster_event.pid


def _alive(pid: int, started_at: float | None) -> bool:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_at is None or process.create_time() <= started_at + START_SLACK_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def dead_runs(instance: DagsterInstance) -> list[tuple[str, int]]:
    """(run id, pid) of every STARTED run whose worker process is gone, and of every NOT_STARTED run of
    `gpl run` on this machine whose process is gone."""
    found = []
    for record in instance.get_run_records(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        pid = _worker_pid(instance, record.dagster_run.run_id)
        if pid is not None and not _alive(pid, record.start_time):
            found.append((record.dagster_run.run_id, pid))
    # No RUN_START event yet: the process is the one named by the tags `gpl run` sets on its runs.
    mine = RunsFilter(statuses=[DagsterRunStatus.NOT_STARTED], tags={HOST_TAG: socket.gethostname()})
    for record in instance.get_run_records(filters=mine):
        pid, created = record.dagster_run.tags.get(PID_TAG, ""), record.create_timestamp.timestamp()
        if pid.isdigit() and time.time() - created > NOT_STARTED_SLACK_S and not _alive(int(pid), created):
            found.append((record.dagster_run.run_id, int(pid)))
    return found


def _mark_failed(instance: DagsterInstance, run: DagsterRun, message: str) -> None:
    # not @public in Dagster 1.13 (its run monitoring uses both), no public way without a webserver: OPERATIONS.md
    instance.report_run_failed(run, message)
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    log.warning("run %s: %s", run.run_id, message)


def fail_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark every dead run failed and free its concurrency slots; returns their ids."""
    failed = []
    for run_id, pid in dead_runs(instance):
        run = instance.get_run_by_id(run_id)
        if run is None or run.status not in (DagsterRunStatus.STARTED, DagsterRunStatus.NOT_STARTED):
            continue
        _mark_failed(
            instance,
            run,
            f"The run's process (pid {pid}) is gone (killed or crashed) while the run was {run.status.value}: "
            "marked failed by the gpl watchdog (assets/run_health.py) so that queued runs can start.",
        )
        failed.append(run_id)
    return failed


def fail_unfinished_runs(instance: DagsterInstance, run_ids: Iterable[str], message: str) -> list[str]:
    """Mark failed every run of ``run_ids`` that has not finished (NOT_STARTED, QUEUED, STARTING, STARTED)
    and free its concurrency slots; returns their ids. For a process that stops its own runs: Dagster
    fails a run it is executing when interrupted, not one it created but had not started yet."""
    failed = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in UNFINISHED:
            _mark_failed(instance, run, message)
            failed.append(run_id)
    return failed
