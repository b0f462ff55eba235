import time
from datetime import date

import pandas as pd
import pytest

from gpl_platform.data.warehouse import Warehouse, WarehouseLockedError, WarehouseSourceMismatch
from tests.helpers import hold_duckdb_lock


def _events(day: str, n: int, tag: str = "x") -> pd.DataFrame:
    t = pd.Timestamp(f"{day}T12:00:00Z")
    return pd.DataFrame(
        {
            "day": [date.fromisoformat(day)] * n,
            "request_id": [f"{tag}{k}" for k in range(n)],
            "user_id": "u",
            "item_id": [f"i{k}" for k in range(n)],
            "event_time": pd.Series([t] * n).astype("datetime64[us, UTC]"),
            "exposed": True,
            "clicked": pd.array([1] * n, dtype="Int8"),
            "propensity": 0.5,
            "logging_policy": "production",
        }
    )


def test_replacing_a_partition_never_duplicates(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    d1, d2 = date(2024, 1, 1), date(2024, 1, 2)
    for _ in range(3):
        with wh.transaction() as con:
            wh.replace_partitions(
                "events", pd.concat([_events("2024-01-01", 4), _events("2024-01-02", 2)]), [d1, d2], con
            )
    counts = wh.query("SELECT day, count(*) AS n FROM events GROUP BY day ORDER BY day")
    assert counts["n"].tolist() == [4, 2]
    with wh.transaction() as con:  # re-running one day leaves the other alone
        wh.replace_partitions("events", _events("2024-01-02", 5, "y"), [d2], con)
    assert wh.query("SELECT count(*) AS n FROM events")["n"].iloc[0] == 9
    assert wh.written_days("events") == {d1, d2}


def test_empty_partition_is_recorded(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.transaction() as con:
        wh.replace_partitions("events", _events("2024-01-01", 0), [date(2024, 1, 1)], con)
    assert wh.query("SELECT n_rows FROM partitions")["n_rows"].tolist() == [0]


def test_failed_write_leaves_previous_state(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.transaction() as con:
        wh.replace_partitions("events", _events("2024-01-01", 3), [date(2024, 1, 1)], con)
    with pytest.raises(RuntimeError, match="boom"):
        with wh.transaction() as con:
            wh.replace_partitions("events", _events("2024-01-01", 7, "new"), [date(2024, 1, 1)], con)
            raise RuntimeError("boom")
    rows = wh.query("SELECT request_id FROM events ORDER BY request_id")
    assert rows["request_id"].tolist() == ["x0", "x1", "x2"]


def test_rows_outside_the_written_days_are_refused(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with pytest.raises(ValueError, match="outside the partitions"):
        with wh.transaction() as con:
            wh.replace_partitions("events", _events("2024-01-03", 1), [date(2024, 1, 1)], con)


def _table_with_one_row(path):
    with Warehouse(path).transaction() as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")


def test_lock_held_by_another_process_waits_then_fails_clearly(tmp_path):
    path = tmp_path / "w.duckdb"
    _table_with_one_row(path)
    holder = hold_duckdb_lock(path, 30)
    try:
        began = time.monotonic()
        with pytest.raises(WarehouseLockedError, match="locked by another process"):
            with Warehouse(path, lock_timeout_s=1.0).connect():
                pass
        assert time.monotonic() - began >= 1.0  # it waited before giving up
    finally:
        holder.kill()
        holder.wait()
    with Warehouse(path).connect(read_only=True) as con:  # data intact after the contention
        assert con.execute("SELECT x FROM t").fetchone() == (1,)


def test_lock_released_in_time_lets_the_run_proceed(tmp_path):
    path = tmp_path / "w.duckdb"
    _table_with_one_row(path)
    holder = hold_duckdb_lock(path, 1.0)
    with Warehouse(path, lock_timeout_s=20).transaction() as con:
        con.execute("INSERT INTO t VALUES (2)")
    holder.wait()
    assert Warehouse(path).query("SELECT count(*) AS n FROM t")["n"].iloc[0] == 2


def test_source_mismatch_is_refused(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.transaction() as con:
        wh.claim_source({"source": "simulator"}, con)
        wh.replace_partitions("events", _events("2024-01-01", 1), [date(2024, 1, 1)], con)
    with pytest.raises(WarehouseSourceMismatch, match="another source"):
        with wh.transaction() as con:
            wh.claim_source({"source": "movielens-100k"}, con)


def test_every_connection_of_the_settings_warehouse_runs_under_the_memory_cap(tmp_path):
    from pydantic import ValidationError

    from gpl_platform.config import load_settings

    def limit(warehouse, read_only=False):
        with warehouse.connect(read_only=read_only) as con:
            return con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]

    settings = load_settings({"data_dir": str(tmp_path), "streaming": {"duckdb_memory_limit": "300MB"}})
    capped = Warehouse.for_settings(settings)
    assert limit(capped) == "286.1 MiB"  # DuckDB prints the cap in binary units
    assert limit(capped, read_only=True) == "286.1 MiB"
    assert limit(Warehouse(capped.path)) != "286.1 MiB"  # without the cap: DuckDB's default share of RAM
    with pytest.raises(ValidationError, match="duckdb_memory_limit"):
        load_settings({"data_dir": str(tmp_path), "streaming": {"duckdb_memory_limit": "2GB'; DROP TABLE events; --"}})
