"""Day-partitioned contract deliveries (events/day=YYYY-MM-DD/), nested folders, the plausible time
window, the first day without reading rows, and the content digests the sensor keeps."""

import os
from datetime import UTC, date, datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from gpl_platform.cli.main import app
from gpl_platform.config import load_settings
from gpl_platform.data.contract import ContractError
from gpl_platform.data.delivery import (
    contract_day_span,
    delivery_fingerprints,
    event_day_folders,
    plausible_time_window,
    read_contract_dir,
    write_event_day,
)
from gpl_platform.data.sources import partition_span
from tests.helpers import tiny_contract_tables, write_contract_dir


def _day_delivery(directory, events=None):
    """The tiny tables with events delivered as one folder per UTC day."""
    items, users, base = tiny_contract_tables()
    events = base if events is None else events
    write_contract_dir(directory, items, users, None)
    days = events["event_time"].dt.tz_convert("UTC").dt.date
    for day, part in events.groupby(days):
        write_event_day(directory, day, part)
    return directory


def test_day_folders_are_read_whole_or_by_day(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    assert sorted(event_day_folders(directory)) == [date(2024, 3, 1), date(2024, 3, 2)]
    whole = read_contract_dir(directory)
    assert len(whole.events) == 5 and whole.info["layout"] == "day folders"
    one = read_contract_dir(directory, days=[date(2024, 3, 2)])
    assert set(one.events["day"]) == {date(2024, 3, 2)} and len(one.events) == 2
    # A day's run reads only its folder: a broken file of another day does not matter to it.
    (directory / "events" / "day=2024-03-01" / "part-0.parquet").write_bytes(b"garbage")
    assert len(read_contract_dir(directory, days=[date(2024, 3, 2)]).events) == 2
    with pytest.raises(ContractError, match=r"day=2024-03-01/part-0.parquet: cannot be read as parquet"):
        read_contract_dir(directory)
    # A day without a folder: no events (and the same columns).
    empty = read_contract_dir(directory, days=[date(2024, 3, 5)])
    assert empty.events.empty and list(empty.events.columns) == list(one.events.columns)


def test_nested_folders_are_read_or_refused_never_skipped(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    (directory / "events" / "_SUCCESS").write_text("")  # Spark's marker: not data
    (directory / "events" / "day=2024-03-01" / ".part-0.parquet.crc").write_text("")
    assert len(read_contract_dir(directory).events) == 5
    (directory / "events" / "backfill").mkdir()
    with pytest.raises(ContractError, match=r"events/backfill: is a folder in events/ that is not named day="):
        read_contract_dir(directory)
    os.rmdir(directory / "events" / "backfill")
    (directory / "events" / "day=2024-03-01" / "extra").mkdir()
    with pytest.raises(ContractError, match=r"day=2024-03-01/extra: is a folder inside events/day=2024-03-01/"):
        read_contract_dir(directory)
    os.rmdir(directory / "events" / "day=2024-03-01" / "extra")
    (directory / "events" / "loose.parquet").write_bytes(b"")
    with pytest.raises(ContractError, match=r"loose.parquet: is a file beside day=YYYY-MM-DD/ folders"):
        read_contract_dir(directory)
    os.remove(directory / "events" / "loose.parquet")
    (directory / "events" / "day=2024-03-01" / "notes.json").write_text("{}")
    with pytest.raises(ContractError, match=r"notes.json: has an unsupported extension"):
        read_contract_dir(directory)


def test_rows_in_the_wrong_day_folder_are_refused(tmp_path):
    items, users, events = tiny_contract_tables()
    directory = tmp_path / "c"
    write_contract_dir(directory, items, users, None)
    write_event_day(directory, date(2024, 3, 1), events)  # two of the rows belong to 2024-03-02
    with pytest.raises(ContractError) as info:
        read_contract_dir(directory)
    assert info.value.n_rows == 2 and "events/day=2024-03-01/part-0.parquet" in str(info.value)
    assert "another UTC day than their day=YYYY-MM-DD folder" in str(info.value)


@pytest.mark.parametrize("when", ["1970-01-01T00:00:00Z", "2200-01-01T00:00:00Z"])
def test_event_times_outside_the_plausible_window_are_refused_naming_the_rows(tmp_path, when):
    items, users, events = tiny_contract_tables()
    events.loc[events["request_id"] == "r2", "event_time"] = pd.Timestamp(when)
    directory = write_contract_dir(tmp_path / "c", items, users, events)
    with pytest.raises(ContractError) as info:
        read_contract_dir(directory)
    message = str(info.value)
    assert info.value.column == "event_time" and info.value.n_rows == 2
    assert "events.parquet" in message and "'r2 at " in message and "plausible window 1990-01-01" in message
    # A real 1970s log passes once the window says so.
    window = plausible_time_window(date(1960, 1, 1), 365 * 300)
    assert len(read_contract_dir(directory, time_window=window).events) == 5
    result = CliRunner().invoke(app, ["data", "validate", str(directory)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "plausible window" in result.output


def test_first_day_without_reading_rows(tmp_path):
    items, users, events = tiny_contract_tables()
    flat = write_contract_dir(tmp_path / "flat", items, users, events)
    assert contract_day_span(flat) == (date(2024, 3, 1), date(2024, 3, 2))  # parquet statistics
    assert contract_day_span(_day_delivery(tmp_path / "days")) == (date(2024, 3, 1), date(2024, 3, 2))  # names
    csv = write_contract_dir(
        tmp_path / "csv",
        items,
        users,
        events.assign(event_time=events["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")),
        fmt="csv",
    )
    assert contract_day_span(csv) is None
    settings = load_settings({"source": "contract", "contract": {"path": str(csv)}})
    with pytest.raises(ContractError, match="GPL_CONTRACT__START_DATE"):
        partition_span(settings)
    assert partition_span(
        load_settings({"source": "contract", "contract": {"path": str(csv), "start_date": "2024-02-01"}})
    ) == (date(2024, 2, 1), None)
    # A clock error in the statistics does not make 20,000 partitions: the start is clamped (validation names it).
    events.loc[0, "event_time"] = pd.Timestamp("1970-01-01T00:00:00Z")
    broken = write_contract_dir(tmp_path / "broken", items, users, events)
    start, end = partition_span(load_settings({"source": "contract", "contract": {"path": str(broken)}}))
    assert start == date(1990, 1, 1) and end is None


def test_delivery_digests_follow_content_not_file_times(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    digests, files = delivery_fingerprints(directory)
    assert set(digests) == {"catalog", "2024-03-01", "2024-03-02"}
    # The same bytes written again (new mtime): the same digests.
    part = directory / "events" / "day=2024-03-02" / "part-0.parquet"
    data = part.read_bytes()
    part.write_bytes(data)
    os.utime(part, ns=(1, 1))
    again, _ = delivery_fingerprints(directory, files)
    assert again == digests
    # Other content for one day: only that day's digest changes.
    items, users, events = tiny_contract_tables()
    changed = events[events["request_id"] == "r2"].assign(exposed=False, clicked=pd.array([None, None], dtype="Int8"))
    write_event_day(directory, date(2024, 3, 2), changed)
    after, table = delivery_fingerprints(directory, files)
    assert after["2024-03-02"] != digests["2024-03-02"]
    assert {k: v for k, v in after.items() if k != "2024-03-02"} == {
        k: v for k, v in digests.items() if k != "2024-03-02"
    }
    # A file whose size and mtime are known is not read again (its recorded sha is trusted).
    rel = "events/day=2024-03-01/part-0.parquet"
    trusted = {**table, rel: [table[rel][0], table[rel][1], "0" * 64]}
    assert delivery_fingerprints(directory, trusted)[0]["2024-03-01"] != after["2024-03-01"]


def test_flat_layout_is_not_a_delivery(tmp_path):
    items, users, events = tiny_contract_tables()
    flat = write_contract_dir(tmp_path / "flat", items, users, events)
    assert event_day_folders(flat) is None
    with pytest.raises(ContractError, match="not a day-folder delivery"):
        delivery_fingerprints(flat)


def test_plausible_window_defaults():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    start, end = plausible_time_window(now=now)
    assert start == datetime(1990, 1, 1, tzinfo=UTC) and end == datetime(2026, 1, 2, tzinfo=UTC)


def test_cli_validates_a_day_folder_delivery_in_one_line(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "validate", str(directory)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "valid: 3 items, 2 users, 5 events in 2 requests over 2 days (2024-03-01 .. 2024-03-02)"
    )
    (directory / "events" / "day=2024-03-02" / "late").mkdir()
    result = runner.invoke(app, ["data", "validate", str(directory)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "day=2024-03-02/late: is a folder inside events/day=2024-03-02/" in result.output


def test_day_folders_of_csv_files(tmp_path):
    items, users, events = tiny_contract_tables()
    directory = tmp_path / "c"
    write_contract_dir(directory, items, users, None, fmt="csv")
    for day, part in events.groupby(events["event_time"].dt.date):
        folder = directory / "events" / f"day={day}"
        folder.mkdir(parents=True)
        part.assign(event_time=part["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(
            folder / "part-0.csv", index=False
        )
    assert contract_day_span(directory) == (date(2024, 3, 1), date(2024, 3, 2))  # from the names, rows unread
    assert len(read_contract_dir(directory).events) == 5
    assert set(read_contract_dir(directory, days=[date(2024, 3, 1)]).events["request_id"]) == {"r1"}


def test_an_interrupted_day_write_is_invisible_and_a_rewrite_replaces_the_day(tmp_path):
    directory = _day_delivery(tmp_path / "c")
    digests, _ = delivery_fingerprints(directory)
    # What a write killed half-way leaves: the hidden staging folder of a new day, and of an existing one.
    _, _, events = tiny_contract_tables()
    for day in ("2024-03-03", "2024-03-02"):
        staging = directory / "events" / f".day={day}.tmp"
        staging.mkdir()
        (staging / "part-0.parquet").write_bytes(b"half a file")
    assert sorted(event_day_folders(directory)) == [date(2024, 3, 1), date(2024, 3, 2)]
    assert len(read_contract_dir(directory).events) == 5
    assert delivery_fingerprints(directory)[0] == digests  # the sensor sees nothing new
    # The next write of the day cleans its staging folder, and replaces the day's files (not adds to them).
    day2 = events[events["request_id"] == "r2"]
    write_event_day(directory, date(2024, 3, 2), day2, name="part-1.parquet")
    assert sorted(p.name for p in (directory / "events" / "day=2024-03-02").iterdir()) == ["part-1.parquet"]
    assert not (directory / "events" / ".day=2024-03-02.tmp").exists()
    assert len(read_contract_dir(directory).events) == 5


def test_other_tables_refuse_nested_folders(tmp_path):
    items, users, events = tiny_contract_tables()
    directory = write_contract_dir(tmp_path / "c", None, users, events)
    (directory / "items" / "day=2024-03-01").mkdir(parents=True)
    items.to_parquet(directory / "items" / "day=2024-03-01" / "part-0.parquet", index=False)
    with pytest.raises(ContractError, match=r"items/day=2024-03-01: is a folder inside items/: nested folders"):
        read_contract_dir(directory)


def test_the_time_window_is_configured_by_settings(tmp_path, monkeypatch):
    items, users, events = tiny_contract_tables()
    events.loc[events["request_id"] == "r2", "event_time"] = pd.Timestamp("1975-06-01T12:00:00Z")
    directory = write_contract_dir(tmp_path / "c", items, users, events)
    runner = CliRunner()
    refused = runner.invoke(app, ["data", "validate", str(directory)])
    assert refused.exit_code == 1 and "2 row(s) lie outside the plausible window" in refused.output
    monkeypatch.setenv("GPL_CONTRACT__EARLIEST_EVENT_TIME", "1970-01-01")
    accepted = runner.invoke(app, ["data", "validate", str(directory)])
    assert accepted.exit_code == 0 and "(1975-06-01 .. 2024-03-01)" in accepted.output, accepted.output
    # The future edge: events up to now + max_future_days pass, later ones do not.
    tomorrow = pd.Timestamp.now(tz="UTC").floor("s") + pd.Timedelta(hours=20)
    events.loc[events["request_id"] == "r2", "event_time"] = tomorrow
    write_contract_dir(directory, None, None, events)
    assert runner.invoke(app, ["data", "validate", str(directory)]).exit_code == 0
    monkeypatch.setenv("GPL_CONTRACT__MAX_FUTURE_DAYS", "0")
    result = runner.invoke(app, ["data", "validate", str(directory)])
    assert result.exit_code == 1 and "'r2 at " in result.output


def test_a_source_exports_as_a_daily_delivery_read_back_a_day_at_a_time(tmp_path):
    """`gpl data export --by-day`: the simulator's world as events/day=.../ folders; each day reads back as the
    source's events of that day (the scale benchmark ingests its worlds this way)."""
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir

    world = load_source(load_settings({"source": "simulator", "data_dir": str(tmp_path / "data")}))
    out = tmp_path / "delivery"
    result = CliRunner().invoke(app, ["data", "export", str(out), "--source", "simulator", "--by-day"])
    assert result.exit_code == 0, result.output
    days = sorted(set(world.events["day"]))
    assert sorted(event_day_folders(out)) == days and not (out / "events.parquet").exists()
    columns = ["request_id", "user_id", "item_id", "event_time", "exposed", "clicked", "oracle_label"]
    for day in (days[0], days[-1]):
        read = read_contract_dir(out, days=[day]).events
        want = world.events[world.events["day"] == day]
        pd.testing.assert_frame_equal(
            read[columns].sort_values(["request_id", "item_id"], ignore_index=True),
            want[columns].sort_values(["request_id", "item_id"], ignore_index=True),
            check_dtype=False,
        )
    with pytest.raises(ContractError, match="table folder"):  # never into an earlier delivery
        export_contract_dir(world, out, by_day=True)
    flat = tmp_path / "flat"
    export_contract_dir(world, flat)
    with pytest.raises(ContractError, match="has an events file"):
        export_contract_dir(world, flat, by_day=True)
    with pytest.raises(ValueError, match="parquet"):
        export_contract_dir(world, tmp_path / "csv", csv=True, by_day=True)


def test_a_delivered_day_in_chunks_of_whole_requests_validates_like_the_whole_day(tmp_path):
    """delivered_event_chunks: DuckDB reads the day's parquet files a chunk of whole requests at a time; the chunks
    hold the day's rows, validated and normalized as read_contract_dir gives them, and a broken row in any
    chunk fails with the file named."""
    from gpl_platform.data.delivery_chunks import delivered_event_chunks
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir

    world = load_source(load_settings({"source": "simulator", "data_dir": str(tmp_path / "data")}))
    out = tmp_path / "delivery"
    export_contract_dir(world, out, by_day=True)
    day = sorted(set(world.events["day"]))[2]
    whole = read_contract_dir(out, days=[day]).events
    ((read_day, day_chunks),) = delivered_event_chunks(out, [day], chunk_rows=97)
    chunks = list(day_chunks)
    assert read_day == day
    assert len(chunks) == -(-len(whole) // 97) > 3
    requests = [set(c["request_id"]) for c in chunks]
    assert sum(map(len, requests)) == len(set.union(*requests)) == whole["request_id"].nunique()  # whole requests
    keys = ["request_id", "item_id"]
    got = pd.concat(chunks, ignore_index=True).sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(got, whole.sort_values(keys, ignore_index=True), check_dtype=False)
    assert list(got.columns) == list(whole.columns) and str(got["clicked"].dtype) == str(whole["clicked"].dtype)
    no_folder = date(2030, 1, 1)
    assert [(d, list(c)) for d, c in delivered_event_chunks(out, [no_folder], 97)] == [(no_folder, [])]

    part = next((out / "events" / f"day={day.isoformat()}").glob("*.parquet"))
    broken = pd.read_parquet(part)
    late = broken.index[broken["request_id"] == chunks[-1]["request_id"].iloc[0]][0]  # a row of the last chunk
    broken.loc[late, "item_id"] = "unknown-item"
    broken.to_parquet(part, index=False)
    with pytest.raises(ContractError, match=r"day=.*part-0\.parquet.*missing from the items table"):
        [list(c) for _, c in delivered_event_chunks(out, [day], chunk_rows=97)]
