"""Deliveries written by a careless upstream or by someone who can only write files into the delivery folder:
names that try to leave their SQL identifier, links out of the directory at any depth, header names that
collide, clock-error day folders, and a re-delivered catalog that would orphan events. Each is refused with the
file named, and nothing is written."""

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from gpl_platform.data import ingestion
from gpl_platform.data.contract import ContractError
from gpl_platform.data.delivery import delivery_fingerprints, event_day_folders, read_contract_dir, write_event_day
from gpl_platform.data.delivery_chunks import delivered_event_chunks, delivered_item_ids
from gpl_platform.data.sql import quote_identifier, quote_literal
from gpl_platform.data.warehouse import Warehouse
from tests.helpers import tiny_contract_tables, write_contract_dir

SECRET = "TOP-SECRET-42"


def _day_delivery(directory, events=None):
    items, users, base = tiny_contract_tables()
    events = base if events is None else events
    write_contract_dir(directory, items, users, None)
    for day, part in events.groupby(events["event_time"].dt.tz_convert("UTC").dt.date):
        write_event_day(directory, day, part)
    return directory


def _secret_file(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    path = outside / "secret.txt"
    path.write_text(SECRET + "\n")
    return path


def _read_every_way(directory, day, columns_only=False):
    """Every read path of a day-folder delivery, each run to the end (``columns_only``: those that read every
    column of the files, not only their bytes or one column)."""
    yield lambda: read_contract_dir(directory)
    yield lambda: read_contract_dir(directory, days=[day])
    yield lambda: [list(chunks) for _, chunks in delivered_event_chunks(directory, [day], chunk_rows=2)]
    if not columns_only:
        yield lambda: delivery_fingerprints(directory)
        yield lambda: delivered_item_ids(directory)


# ---- identifiers from data ----------------------------------------------------------------


@pytest.mark.parametrize("name", ['vendor"note', 'a""b', "x'); DROP TABLE t; --", "naïve ✓", "select"])
def test_quoted_names_and_strings_reach_duckdb_as_data(name):
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT 1 AS {quote_identifier(name)}, {quote_literal(name)} AS s")
    assert [d[0] for d in con.execute("SELECT * FROM t").description] == [name, "s"]
    assert con.execute("SELECT s FROM t").fetchall() == [(name,)]
    with pytest.raises(ValueError, match="NUL"):
        quote_identifier("a\x00b")


def test_a_column_name_cannot_inject_sql_into_the_chunked_read(tmp_path):
    """An events column named to close its identifier and read a local file: the name stays a name, the file is
    never read, and the day is ingested as if the column were any extra column."""
    secret = _secret_file(tmp_path)
    _, _, events = tiny_contract_tables()
    evil = f"request_id\", CAST((SELECT content FROM read_text('{secret}')) AS INTEGER) AS \"z"
    events[evil] = 1
    events['vendor"note'] = "ok"
    directory = _day_delivery(tmp_path / "c", events)
    chunks = [c for _, day_chunks in delivered_event_chunks(directory, [date(2024, 3, 1)], 2) for c in day_chunks]
    got = pd.concat(chunks)
    assert len(got) == 3 and set(got["item_id"]) == {"a", "b", "c"}
    assert SECRET not in got.to_csv()


def test_names_of_warehouse_tables_are_quoted(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    assert wh.replace_table('odd "name', pd.DataFrame({"x": [1, 2]})) == 2
    assert wh.query('SELECT sum(x) AS s FROM "odd ""name"')["s"].iloc[0] == 3


# ---- header names -------------------------------------------------------------------------


def test_a_repeated_csv_header_is_refused_by_name(tmp_path):
    items, users, events = tiny_contract_tables()
    directory = write_contract_dir(tmp_path / "c", items, users, events, fmt="csv")
    text = (directory / "items.csv").read_text().splitlines()
    header = text[0] + ",genre"
    (directory / "items.csv").write_text("\n".join([header] + [line + ",z" for line in text[1:]]) + "\n")
    with pytest.raises(ContractError, match=r"items.csv: column 'genre'.*appears twice"):
        read_contract_dir(directory)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_column_with_an_internal_name_is_refused_not_dropped(tmp_path, fmt):
    items, users, events = tiny_contract_tables()
    events["__origin_file"] = "mine"
    directory = write_contract_dir(tmp_path / "c", items, users, events, fmt=fmt)
    with pytest.raises(ContractError, match=r"events\.\w+: column '__origin_file'.*reserves"):
        read_contract_dir(directory)


def test_internal_and_control_character_names_are_refused_in_a_day_folder(tmp_path):
    _, _, events = tiny_contract_tables()
    directory = _day_delivery(tmp_path / "c", events.assign(__origin_file="x"))
    for read in _read_every_way(directory, date(2024, 3, 1), columns_only=True):
        with pytest.raises(ContractError, match="__origin_file"):
            read()
    directory = _day_delivery(tmp_path / "d", events.assign(**{"bad\nname": 1}))
    with pytest.raises(ContractError, match="control characters"):
        read_contract_dir(directory, days=[date(2024, 3, 1)])


# ---- links out of the delivery ------------------------------------------------------------


def test_a_day_file_linked_outside_is_refused_on_every_read_path(tmp_path):
    secret = _secret_file(tmp_path)
    directory = _day_delivery(tmp_path / "c")
    day_dir = directory / "events" / "day=2024-03-01"
    (day_dir / "part-0.parquet").unlink()
    (day_dir / "part-0.csv").symlink_to(secret)
    for read in _read_every_way(directory, date(2024, 3, 1)):
        with pytest.raises(ContractError, match="symbolic link .* outside the contract directory") as info:
            read()
        assert SECRET not in str(info.value)


def test_a_day_folder_or_the_events_folder_linked_outside_is_refused(tmp_path):
    _secret_file(tmp_path)
    elsewhere = _day_delivery(tmp_path / "elsewhere")  # a real delivery somewhere else on the machine
    directory = _day_delivery(tmp_path / "c")
    target = directory / "events" / "day=2024-03-02"
    os.rename(target, tmp_path / "moved")
    target.symlink_to(elsewhere / "events" / "day=2024-03-02", target_is_directory=True)
    for read in _read_every_way(directory, date(2024, 3, 2)):
        with pytest.raises(ContractError, match="day=2024-03-02.*symbolic link"):
            read()
    with pytest.raises(ContractError, match="symbolic link"):
        event_day_folders(directory)

    linked_events = tmp_path / "c2"
    _day_delivery(linked_events)
    os.rename(linked_events / "events", tmp_path / "moved-events")
    (linked_events / "events").symlink_to(elsewhere / "events", target_is_directory=True)
    for read in _read_every_way(linked_events, date(2024, 3, 1)):
        with pytest.raises(ContractError, match="symbolic link"):
            read()


def test_links_that_stay_inside_the_delivery_are_followed(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    store = directory / "_store"  # a name starting with "_" is not data itself
    os.rename(directory / "events" / "day=2024-03-02", store)
    (directory / "events" / "day=2024-03-02").symlink_to(store, target_is_directory=True)
    assert len(read_contract_dir(directory).events) == 5


# ---- clock-error day folders --------------------------------------------------------------


@pytest.mark.parametrize("stray", ["1970-01-01", "2200-01-01"])
def test_a_clock_error_day_folder_is_refused_before_any_partition_is_planned(tmp_path, stray):
    from gpl_platform.config import load_settings
    from gpl_platform.data.sources import contract_last_day, partition_span

    directory = _day_delivery(tmp_path / "c")
    (directory / "events" / f"day={stray}").mkdir()
    settings = load_settings({"source": "contract", "contract": {"path": str(directory)}})
    for plan in (partition_span, contract_last_day):
        with pytest.raises(ContractError, match=rf"day={stray}: is a day outside the plausible window"):
            plan(settings)
    with_start = load_settings({"source": "contract", "contract": {"path": str(directory), "start_date": "2024-03-01"}})
    with pytest.raises(ContractError, match=rf"day={stray}"):
        contract_last_day(with_start)


def test_gpl_run_refuses_a_clock_error_folder_in_one_line(tmp_path):
    """The CLI refuses before Dagster plans anything (the timeout turns a regression into a failure, not a hang)."""
    directory = _day_delivery(tmp_path / "c")
    (directory / "events" / "day=1970-01-01").mkdir()
    env = {**os.environ, "GPL_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "dh")}
    (tmp_path / "dh").mkdir()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gpl"), "run", "--source", "contract", "--path", str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "day=1970-01-01: is a day outside the plausible window" in done.stderr
    assert not (tmp_path / "data" / "warehouse.duckdb").exists()


# ---- a refused delivery writes nothing -----------------------------------------------------


def test_a_catalog_that_drops_an_item_of_ingested_or_delivered_events_is_refused(tmp_path):
    from gpl_platform.data.contract import validate_dataset

    items, users, events = tiny_contract_tables()
    wh = Warehouse(tmp_path / "w.duckdb")
    full = validate_dataset("tiny", items, users, events)
    ingestion.ingest_catalog(wh, full, {"source": "tiny"})
    ingestion.ingest_event_days(wh, full, [date(2024, 3, 1)], {"source": "tiny"})
    before = wh.query("SELECT * FROM items ORDER BY item_id")

    smaller = validate_dataset("tiny", items[items["item_id"] != "b"], users, events[events["item_id"] != "b"])
    with pytest.raises(ContractError, match=r"items: column 'item_id': 1 row\(s\) named by ingested events.*'b'"):
        ingestion.ingest_catalog(wh, smaller, {"source": "tiny"})
    pd.testing.assert_frame_equal(before, wh.query("SELECT * FROM items ORDER BY item_id"))

    # "c" is not in the warehouse's events yet (day 2 is delivered, not ingested)
    no_c = validate_dataset("tiny", items[items["item_id"] != "c"], users, events[events["item_id"] == "a"])
    wh2 = Warehouse(tmp_path / "w2.duckdb")
    with pytest.raises(ContractError, match=r"named by delivered events.*'c'"):
        ingestion.ingest_catalog(wh2, no_c, {"source": "tiny"}, delivered_item_ids={"a", "c"})
    assert not wh2.table_exists("items")


def test_delivered_item_ids_reads_every_day_and_skips_an_unreadable_file(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    assert delivered_item_ids(directory) == {"a", "b", "c"}
    (directory / "events" / "day=2024-03-02" / "part-1.parquet").write_bytes(b"garbage")
    assert delivered_item_ids(directory) == {"a", "b", "c"}  # day 1 has all three; day 2's own run refuses it


def test_a_refused_day_leaves_every_day_of_the_run_as_it_was(tmp_path):
    from gpl_platform.data.contract import validate_dataset

    items, users, events = tiny_contract_tables()
    wh = Warehouse(tmp_path / "w.duckdb")
    ds = validate_dataset("tiny", items, users, events)
    ingestion.ingest_catalog(wh, ds, {"source": "tiny"})
    days = [date(2024, 3, 1), date(2024, 3, 2)]
    ingestion.ingest_event_days(wh, ds, days, {"source": "tiny"})
    before = wh.query("SELECT * FROM events ORDER BY request_id, item_id")

    changed = ds.events[ds.events["day"] == days[0]].assign(clicked=lambda f: 1 - f["clicked"])  # re-delivered

    def refused():
        yield ds.events[ds.events["day"] == days[1]]
        raise ContractError("events/day=2024-03-02/part-0.parquet", "item_id", 1, "name items missing")

    with pytest.raises(ContractError):
        ingestion.ingest_delivered_days(wh, lambda: [(days[0], [changed]), (days[1], refused())], {"source": "tiny"})
    pd.testing.assert_frame_equal(before, wh.query("SELECT * FROM events ORDER BY request_id, item_id"))
