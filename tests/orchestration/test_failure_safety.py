"""Failure safety of Dagster runs against the DuckDB warehouse.

- a run SIGKILLed inside the write transaction of a partition leaves the previous data readable
  and intact, and a re-run succeeds;
- two materializations of the same partition (one after the other, or at the same time from two
  processes) never leave duplicates;
- a DuckDB lock held by another process makes the run wait, then fail with a clear message; the
  data is untouched.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from dagster import DagsterInstance

from assets.partitions import range_tags
from assets.resources import GplSettings
from tests.helpers import hold_duckdb_lock, run_assets

DAY = "2024-01-02"

# Runs in a child process: materialize candidate_events[DAY], but with a hook in the middle of the
# write transaction (after the new rows of `events` are inserted, before COMMIT) that marks the
# rows, says so on stdout, and sleeps until the parent kills the process.
KILLED_RUN = textwrap.dedent("""
    import sys, time, warnings
    warnings.filterwarnings("ignore")
    from dagster import DagsterInstance, materialize
    from gpl_platform.data.warehouse import Warehouse

    original = Warehouse.replace_partitions

    def hooked(self, table, frame, days, con, run_id=None):
        if table == "events":
            frame = frame.assign(request_id="KILLED-" + frame["request_id"])
        out = original(self, table, frame, days, con, run_id)
        if table == "events":
            print("IN_TRANSACTION", flush=True)
            time.sleep(120)
        return out

    Warehouse.replace_partitions = hooked
    from assets.definitions import defs
    materialize([*defs.assets, *defs.asset_checks], selection=["candidate_events"], partition_key=sys.argv[1],
                resources=defs.resources, instance=DagsterInstance.ephemeral())
""")

PLAIN_RUN = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    from dagster import DagsterInstance, materialize
    from assets.definitions import defs
    print("START", flush=True)
    result = materialize([*defs.assets, *defs.asset_checks], selection=["candidate_events"], partition_key=sys.argv[1],
                         resources=defs.resources, instance=DagsterInstance.ephemeral(), raise_on_error=False)
    print("SUCCESS" if result.success else "FAILURE", flush=True)
    sys.exit(0 if result.success else 1)
""")


def _env(data_dir, **extra) -> dict:
    env = os.environ.copy()  # conftest's GPL_* settings (simulator world)
    env.update({"GPL_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture
def ingested(tmp_path, dagster_defs):
    """Catalog + events of 2024-01-01..03 in a fresh warehouse."""
    data = tmp_path / "data"
    gpl = GplSettings(data_dir=str(data))
    instance = DagsterInstance.ephemeral()
    assert run_assets(dagster_defs, gpl, ["item_catalog", "users"], instance).success
    assert run_assets(
        dagster_defs, gpl, ["candidate_events"], instance, tags=range_tags("2024-01-01", "2024-01-03")
    ).success
    return gpl, data


def _snapshot(gpl):
    wh = gpl.warehouse()
    events = wh.query("SELECT * FROM events ORDER BY day, request_id, item_id")
    parts = wh.query("SELECT table_name, day, n_rows, written_at, run_id FROM partitions ORDER BY ALL")
    return events, parts


def _no_duplicates(gpl) -> None:
    dup = gpl.warehouse().query("SELECT request_id, item_id, count(*) AS n FROM events GROUP BY ALL HAVING n > 1")
    assert dup.empty, dup.head()


def test_run_killed_inside_the_write_transaction_leaves_previous_data(ingested, dagster_defs):
    gpl, data = ingested
    events_before, parts_before = _snapshot(gpl)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, DAY],
        env=_env(data),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and "IN_TRANSACTION" not in line:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                break
        assert "IN_TRANSACTION" in line, "the child never reached the write transaction"
        os.kill(child.pid, signal.SIGKILL)  # mid-transaction: new rows inserted, not committed
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL

    # The previous data is readable (read-only, as the UI and checks read it) and unchanged.
    events_after, parts_after = _snapshot(gpl)
    pd.testing.assert_frame_equal(events_before, events_after)
    pd.testing.assert_frame_equal(parts_before, parts_after)
    assert not events_after["request_id"].str.startswith("KILLED-").any()

    # Re-running the partition succeeds and replaces it: same rows, no duplicates.
    result = run_assets(dagster_defs, gpl, ["candidate_events"], partition_key=DAY)
    assert result.success
    events_rerun, parts_rerun = _snapshot(gpl)
    pd.testing.assert_frame_equal(events_before, events_rerun)
    _no_duplicates(gpl)
    rerun_day = parts_rerun[(parts_rerun["table_name"] == "events") & (parts_rerun["day"].astype(str) == DAY)]
    assert rerun_day["run_id"].iloc[0] == result.run_id


def test_two_simultaneous_materializations_of_one_partition_leave_no_duplicates(ingested):
    gpl, data = ingested
    events_before, _ = _snapshot(gpl)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", PLAIN_RUN, DAY],
            env=_env(data, GPL_WAREHOUSE_LOCK_TIMEOUT_S="60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=120)
            outputs.append((child.returncode, out))
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
    assert [rc for rc, _ in outputs] == [0, 0], outputs  # the second writer waited for the first
    events_after, parts_after = _snapshot(gpl)
    pd.testing.assert_frame_equal(events_before, events_after)
    _no_duplicates(gpl)
    assert (parts_after.groupby(["table_name", "day"]).size() == 1).all()


def test_lock_held_by_another_process_fails_the_run_clearly_and_changes_nothing(ingested, dagster_defs):
    gpl, data = ingested
    events_before, parts_before = _snapshot(gpl)
    impatient = GplSettings(data_dir=str(data), overrides_json='{"warehouse_lock_timeout_s": 1}')
    holder = hold_duckdb_lock(gpl.settings().warehouse, 60)
    try:
        began = time.monotonic()
        result = run_assets(dagster_defs, impatient, ["candidate_events"], partition_key=DAY, raise_on_error=False)
        waited = time.monotonic() - began
    finally:
        holder.kill()
        holder.wait()
    assert not result.success and waited >= 1.0
    error = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "WarehouseLockedError" in error and "locked by another process" in error
    assert "GPL_WAREHOUSE_LOCK_TIMEOUT_S" in error  # says what to do
    events_after, parts_after = _snapshot(gpl)
    pd.testing.assert_frame_equal(events_before, events_after)
    pd.testing.assert_frame_equal(parts_before, parts_after)


def test_lock_released_in_time_lets_the_run_wait_and_succeed(ingested, dagster_defs):
    gpl, data = ingested
    events_before, _ = _snapshot(gpl)
    patient = GplSettings(data_dir=str(data), overrides_json='{"warehouse_lock_timeout_s": 30}')
    holder = hold_duckdb_lock(gpl.settings().warehouse, 2.0)
    try:
        result = run_assets(dagster_defs, patient, ["candidate_events"], partition_key=DAY)
    finally:
        holder.wait(timeout=30)
    assert result.success
    pd.testing.assert_frame_equal(events_before, _snapshot(gpl)[0])
    _no_duplicates(gpl)
