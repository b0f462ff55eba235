"""`gpl run` against a warehouse another process holds: after `warehouse_lock_timeout_s` (1 s here) the error
line is the platform's WarehouseLockedError with its guidance, not the DuckDB IOException under it."""

import subprocess
import sys

from tests.helpers import hold_duckdb_lock
from tests.live import ROOT, instance_home, live_env


def test_a_locked_warehouse_fails_with_the_documented_error_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = live_env(instance_home(tmp_path), data, GPL_WAREHOUSE_LOCK_TIMEOUT_S="1")
    holder = hold_duckdb_lock(data / "warehouse.duckdb", 600)  # the default warehouse path of that data dir
    try:
        out = subprocess.run(
            [sys.executable, "-m", "gpl_platform.cli.main", "run", "--select", "item_catalog"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unpartitioned stage failed (run "), last
    assert f"WarehouseLockedError: {data / 'warehouse.duckdb'} is locked by another process" in last, last
    assert "Wait for the other run to finish, or raise GPL_WAREHOUSE_LOCK_TIMEOUT_S" in last, last
    assert "IOException" not in last and "Traceback" not in out.stderr
