"""The new_contract_days sensor, tick by tick (evaluated in process against an ephemeral instance), and
the policy for a day that is missing from a re-delivery."""

import json
from datetime import date, timedelta

import pandas as pd
import pytest
from dagster import DagsterInstance, build_sensor_context

from assets.definitions import build_definitions
from assets.partitions import range_tags
from assets.resources import GplSettings
from assets.sensors import NEW_DAYS_SENSOR
from gpl_platform.data.delivery import write_event_day
from tests.helpers import run_assets, tiny_contract_tables, write_contract_dir


def _deliver(directory, events, days=None):
    days_of = events["event_time"].dt.tz_convert("UTC").dt.date
    for day, part in events.groupby(days_of):
        if days is None or day in days:
            write_event_day(directory, day, part)


@pytest.fixture
def delivery(tmp_path):
    items, users, events = tiny_contract_tables()
    directory = write_contract_dir(tmp_path / "contract", items, users, None)
    return directory, events


class Ticks:
    """Evaluates the sensor like the daemon does, keeping the cursor between ticks."""

    def __init__(self, directory, **contract):
        self.gpl = GplSettings(
            source="contract",
            contract_path=str(directory),
            data_dir=str(directory / "data"),
            overrides_json=json.dumps({"contract": contract}) if contract else "{}",
        )
        self.cursor = None

    def tick(self):
        defs = build_definitions(gpl=self.gpl)
        sensor = defs.get_repository_def().get_sensor_def(NEW_DAYS_SENSOR)
        with DagsterInstance.ephemeral() as instance:
            context = build_sensor_context(
                instance=instance,
                cursor=self.cursor,
                resources={"gpl": self.gpl},
                repository_def=defs.get_repository_def(),
            )
            result = sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return [(r.job_name, r.partition_key) for r in result.run_requests], result


def test_sensor_requests_exactly_the_new_or_changed_days(delivery):
    directory, events = delivery
    _deliver(directory, events, {date(2024, 3, 1)})
    ticks = Ticks(directory)
    requested, _ = ticks.tick()
    assert requested == [("gpl_catalog", None), ("gpl_daily", "2024-03-01")]  # the catalog first, then the day
    assert ticks.tick()[0] == []  # nothing new
    _deliver(directory, events, {date(2024, 3, 2)})
    assert ticks.tick()[0] == [("gpl_daily", "2024-03-02")]
    # The same content delivered again (new files, new mtimes): nothing.
    _deliver(directory, events)
    requested, result = ticks.tick()
    assert requested == [] and "no new or changed day folders (2 known)" in result.skip_message
    # Changed content for one day: that day only, under a new run key.
    changed = events.copy()
    changed.loc[changed["request_id"] == "r2", "clicked"] = pd.array([0, None], dtype="Int8")
    _deliver(directory, changed, {date(2024, 3, 2)})
    requested, result = ticks.tick()
    assert requested == [("gpl_daily", "2024-03-02")]
    assert result.run_requests[0].run_key.startswith("2024-03-02@") and result.run_requests[0].run_key.endswith("#2")
    # Back to the first content: changed again, so requested again (a third key).
    _deliver(directory, events, {date(2024, 3, 2)})
    assert ticks.tick()[1].run_requests[0].run_key.endswith("#3")
    # New items: the catalog job.
    items, _, _ = tiny_contract_tables()
    items.loc[0, "text"] = "Alpha film, director's cut"
    items.to_parquet(directory / "items.parquet", index=False)
    assert ticks.tick()[0] == [("gpl_catalog", None)]


def test_a_day_missing_from_the_delivery_follows_the_policy(delivery):
    directory, events = delivery
    _deliver(directory, events)
    # a live directory configures its first day (else the first day folder is the start, and it just moved)
    keep, clear = (
        Ticks(directory, start_date="2024-03-01"),
        Ticks(directory, missing_days="clear", start_date="2024-03-01"),
    )
    keep.tick(), clear.tick()
    import shutil

    shutil.rmtree(directory / "events" / "day=2024-03-01")
    assert keep.tick()[0] == []  # keep (default): its rows stay, nothing runs
    assert clear.tick()[0] == [("gpl_daily", "2024-03-01")]  # clear: re-run as an empty day


def test_flat_contracts_and_benchmarks_are_not_watched(tmp_path):
    items, users, events = tiny_contract_tables()
    flat = write_contract_dir(tmp_path / "flat", items, users, events)
    requested, result = Ticks(flat).tick()
    assert requested == [] and "not a day-folder delivery" in result.skip_message


@pytest.mark.parametrize("policy", ["keep", "clear"])
def test_ingestion_of_a_day_missing_from_the_delivery(delivery, policy):
    """Re-running a day that was delivered before and is gone now: keep its rows (and say so) or clear it."""
    directory, events = delivery
    _deliver(directory, events)
    gpl = GplSettings(
        source="contract",
        contract_path=str(directory),
        data_dir=str(directory / "data"),
        overrides_json=json.dumps({"contract": {"missing_days": policy}}),
    )
    defs = build_definitions(gpl=gpl)
    instance = DagsterInstance.ephemeral()
    assert run_assets(defs, gpl, ["item_catalog", "users"], instance).success
    assert run_assets(defs, gpl, ["candidate_events"], instance, tags=range_tags("2024-03-01", "2024-03-02")).success
    import shutil

    shutil.rmtree(directory / "events" / "day=2024-03-02")
    result = run_assets(defs, gpl, ["candidate_events"], instance, tags=range_tags("2024-03-01", "2024-03-02"))
    assert result.success
    rows = gpl.warehouse().query("SELECT day, count(*) AS n FROM events GROUP BY day ORDER BY day")
    meta = result.asset_materializations_for_node("candidate_events")[0].metadata
    if policy == "keep":
        assert rows["n"].tolist() == [3, 2] and meta["days_kept_missing_from_delivery"].value == "2024-03-02"
        assert meta["days_no_longer_delivered"].value == "2024-03-02"
    else:
        assert rows["n"].tolist() == [3] and meta["days_kept_missing_from_delivery"].value == "none"
    logged = " ".join(e.message or "" for e in instance.all_logs(result.run_id))
    assert "2024-03-02 was delivered before and is missing from the delivery now" in logged


def test_a_broken_delivery_is_a_skip_with_its_reason_and_requests_nothing(delivery):
    directory, events = delivery
    _deliver(directory, events)
    ticks = Ticks(directory, start_date="2024-03-01")
    assert len(ticks.tick()[0]) == 3
    cursor = ticks.cursor
    (directory / "events" / "backfill").mkdir()  # not a day=YYYY-MM-DD folder: refused, not skipped
    requested, result = ticks.tick()
    assert requested == [] and "events/backfill: is a folder in events/ that is not named day=" in result.skip_message
    assert ticks.cursor == cursor  # nothing forgotten: the repaired delivery requests only what changed
    (directory / "events" / "backfill").rmdir()
    assert ticks.tick()[0] == []


def test_a_day_that_is_not_a_partition_yet_is_asked_again_later(delivery):
    directory, events = delivery
    _deliver(directory, events)
    soon = date.today() + timedelta(days=3)  # after the open-ended partitions' last day (today, UTC)
    write_event_day(
        directory,
        soon,
        events[events["request_id"] == "r2"].assign(event_time=pd.Timestamp(soon.isoformat(), tz="UTC")),
    )
    ticks = Ticks(directory, start_date="2024-03-01")
    requested, _ = ticks.tick()
    assert soon.isoformat() not in {key for _, key in requested} and len(requested) == 3
    assert soon.isoformat() not in json.loads(ticks.cursor)["days"]  # not remembered: requested once it is a day
    assert ticks.tick()[0] == []


def test_a_day_run_reads_only_its_folder(delivery):
    """The daily job of one day ingests that day although another day's file is broken (and says nothing
    about the other day)."""
    directory, events = delivery
    _deliver(directory, events)
    gpl = GplSettings(source="contract", contract_path=str(directory), data_dir=str(directory / "data"))
    defs = build_definitions(gpl=gpl)
    instance = DagsterInstance.ephemeral()
    assert run_assets(defs, gpl, ["item_catalog", "users"], instance).success
    (directory / "events" / "day=2024-03-01" / "part-0.parquet").write_bytes(b"garbage")
    day2 = run_assets(defs, gpl, ["candidate_events"], instance, partition_key="2024-03-02")
    assert day2.success
    rows = gpl.warehouse().query("SELECT day, count(*) AS n FROM events GROUP BY day")
    assert rows["n"].tolist() == [2] and str(rows["day"].iloc[0])[:10] == "2024-03-02"
    day1 = run_assets(defs, gpl, ["candidate_events"], instance, partition_key="2024-03-01", raise_on_error=False)
    assert not day1.success
    [failure] = day1.get_step_failure_events()
    assert "day=2024-03-01/part-0.parquet: cannot be read as parquet" in failure.step_failure_data.error.to_string()
