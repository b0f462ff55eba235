"""In-process Dagster materializations of the ingestion assets on simulator data."""

import warnings
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance

from assets.partitions import range_tags
from assets.resources import GplSettings, ignore_dagster_internal_deprecations
from assets.runner import run_pipeline
from gpl_platform.data.stats import export_contract_dir
from gpl_platform.data.warehouse import Warehouse
from tests.helpers import run_assets

INGESTION = ["item_catalog", "users", "candidate_events", "user_histories"]
ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_with_partitions_from_the_source_span(dagster_defs):
    keys = {k.to_user_string() for k in dagster_defs.resolve_all_asset_keys()}
    assert set(INGESTION) <= keys
    partitions = dagster_defs.resolve_job_def("gpl_daily").partitions_def
    # the test world: simulator with 5 days from 2024-01-01
    assert partitions.get_partition_keys() == [f"2024-01-0{d}" for d in range(1, 6)]


def _count(wh, table):
    return int(wh.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0])


def test_materialize_partitions_and_rematerialize_idempotently(tmp_path, dagster_defs):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()
    assert run_assets(dagster_defs, gpl, ["item_catalog", "users"], instance).success
    for key in ("2024-01-01", "2024-01-02"):
        assert run_assets(
            dagster_defs, gpl, ["candidate_events", "user_histories"], instance, partition_key=key
        ).success
    wh = gpl.warehouse()
    events_before, hist_before = _count(wh, "events"), _count(wh, "user_histories")
    assert events_before > 0 and hist_before > 0
    # Again, twice: replaced, not duplicated.
    for _ in range(2):
        assert run_assets(
            dagster_defs, gpl, ["candidate_events", "user_histories"], instance, partition_key="2024-01-02"
        ).success
    assert (_count(wh, "events"), _count(wh, "user_histories")) == (events_before, hist_before)
    mats = instance.fetch_materializations(AssetKey("candidate_events"), limit=10).records
    meta = mats[0].asset_materialization.metadata
    assert meta["partition_span"].value.startswith("2024-01-02")
    assert 0 < meta["exposure_rate"].value < 1


def test_histories_before_events_fail_with_a_clear_error(tmp_path, dagster_defs):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()
    run_assets(dagster_defs, gpl, ["item_catalog", "users"], instance)
    run_assets(dagster_defs, gpl, ["candidate_events"], instance, partition_key="2024-01-03")
    result = run_assets(
        dagster_defs, gpl, ["user_histories"], instance, partition_key="2024-01-03", raise_on_error=False
    )
    assert not result.success
    text = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "MissingUpstreamDays" in text and "not ingested" in text and "2024-01-01" in text


def test_range_run_and_failed_rerun_keeps_previous_data(tmp_path, settings):
    """One run covers the whole range; a later run on bad input fails whole, in one line, and changes nothing."""
    from gpl_platform.data.sources import load_source

    contract_dir = tmp_path / "contract"
    export_contract_dir(load_source(settings), contract_dir)
    gpl = GplSettings(source="contract", contract_path=str(contract_dir), data_dir=str(tmp_path / "data"))
    result = run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    # open-ended contract partitions; the default range ends on the data's last day (parquet statistics)
    assert result.success and result.partition_range == ("2024-01-01", "2024-01-05")
    assert len(result.runs) == 2  # unpartitioned + one run for all 5 days
    wh = gpl.warehouse()
    before = wh.query("SELECT * FROM events ORDER BY request_id, item_id")
    assert wh.query("SELECT count(DISTINCT day) AS n FROM events")["n"].iloc[0] == 5

    events = pd.read_parquet(contract_dir / "events.parquet")
    events.loc[events.index[-3:], "item_id"] = ["unknown-1", "unknown-2", "unknown-3"]
    events.to_parquet(contract_dir / "events.parquet", index=False)
    with pytest.raises(Exception, match="missing from the items table") as failure:
        run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    assert "\n" not in str(failure.value) and "ContractError: " in str(failure.value)
    after = wh.query("SELECT * FROM events ORDER BY request_id, item_id")
    pd.testing.assert_frame_equal(before, after)


def _resources(gpl):
    from assets.resources import gpl_resources

    return gpl_resources(gpl)


def test_run_config_overrides_settings(tmp_path):
    gpl = GplSettings(data_dir=str(tmp_path / "d"), seed=7, overrides_json='{"simulator": {"n_users": 11}}')
    s = gpl.settings()
    assert (s.seed, s.simulator.n_users, s.simulator.n_items) == (7, 11, 300)
    assert s.warehouse == (tmp_path / "d" / "warehouse.duckdb").resolve()
    assert isinstance(gpl.warehouse(), Warehouse)


def test_range_tags_are_the_partition_range_of_a_run(tmp_path, dagster_defs):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()
    run_assets(dagster_defs, gpl, ["item_catalog", "users"], instance)
    assert run_assets(
        dagster_defs, gpl, ["candidate_events"], instance, tags=range_tags("2024-01-02", "2024-01-04")
    ).success
    assert gpl.warehouse().written_days("events") == {
        pd.Timestamp(d).date() for d in ("2024-01-02", "2024-01-03", "2024-01-04")
    }


def test_a_daily_delivery_is_ingested_a_day_at_a_time_in_a_range_run(tmp_path, settings, monkeypatch):
    """A run over five days of a day-folder delivery validates every day, then replaces one day at a time, each
    read in chunks of whole requests (its memory is a chunk's); a broken day fails the run in one line and
    leaves every day's previous rows."""
    from gpl_platform.data import delivery_chunks
    from gpl_platform.data.sources import load_source

    delivery = tmp_path / "contract"
    export_contract_dir(load_source(settings), delivery, by_day=True)
    gpl = GplSettings(
        source="contract",
        contract_path=str(delivery),
        data_dir=str(tmp_path / "data"),
        overrides_json='{"streaming": {"batch_candidates": 40}}',
    )
    chunks = []
    read_chunks = delivery_chunks._parquet_chunks

    def spy(directory, files, chunk_rows, *args):
        for frame in read_chunks(directory, files, chunk_rows, *args):
            chunks.append((files[0].parent.name, len(frame)))
            yield frame

    monkeypatch.setattr(delivery_chunks, "_parquet_chunks", spy)
    catalogs = []
    read_catalog = delivery_chunks.contract_catalog
    monkeypatch.setattr(delivery_chunks, "contract_catalog", lambda d: catalogs.append(d) or read_catalog(d))
    result = run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    assert result.success and len(result.runs) == 2  # unpartitioned + one run for all 5 days
    # the run's days are read twice, validated first and then written: the catalog once each time, not once a day
    assert len(catalogs) == 2
    assert chunks[: len(chunks) // 2] == chunks[len(chunks) // 2 :]
    chunks = chunks[: len(chunks) // 2]
    folders = [name for name, _ in chunks]
    assert sorted(set(folders)) == [f"day=2024-01-0{d}" for d in range(1, 6)] and folders == sorted(folders)
    day_rows = {f: sum(n for g, n in chunks if g == f) for f in set(folders)}
    assert all(n < min(day_rows.values()) / 3 for _, n in chunks)  # several chunks a day, each a fraction of it
    wh = gpl.warehouse()
    before = wh.query("SELECT * FROM events ORDER BY request_id, item_id")
    assert before["day"].nunique() == 5 and len(before) == len(load_source(settings).events) == sum(
        n for _, n in chunks
    )

    part = next((delivery / "events" / "day=2024-01-04").glob("*.parquet"))
    events = pd.read_parquet(part)
    events.loc[events.index[-2:], "item_id"] = ["unknown-1", "unknown-2"]
    events.to_parquet(part, index=False)
    # the catalog step sees the delivered events' unknown items first and refuses before anything is written
    with pytest.raises(Exception, match="missing from the (items table|new catalog)") as failure:
        run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    assert "\n" not in str(failure.value)
    pd.testing.assert_frame_equal(before, wh.query("SELECT * FROM events ORDER BY request_id, item_id"))


def test_a_refused_catalog_and_a_refused_day_write_nothing(tmp_path, settings):
    """A re-delivered catalog without an item that delivered events use is refused before it replaces the old
    one; a run whose last day is refused leaves its earlier days as they were, re-delivered content included."""
    from gpl_platform.data.sources import load_source

    delivery = tmp_path / "contract"
    world = load_source(settings)
    export_contract_dir(world, delivery, by_day=True)
    gpl = GplSettings(source="contract", contract_path=str(delivery), data_dir=str(tmp_path / "data"))
    assert run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION).success
    wh = gpl.warehouse()
    items_before = wh.query("SELECT * FROM items ORDER BY item_id")
    events_before = wh.query("SELECT * FROM events ORDER BY request_id, item_id")

    used = world.events["item_id"].iloc[0]
    world.items[world.items["item_id"] != used].to_parquet(delivery / "items.parquet", index=False)
    with pytest.raises(Exception, match=rf"unpartitioned stage failed.*ContractError: items: column 'item_id'.*{used}"):
        run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    pd.testing.assert_frame_equal(items_before, wh.query("SELECT * FROM items ORDER BY item_id"))

    world.items.to_parquet(delivery / "items.parquet", index=False)
    first = next((delivery / "events" / "day=2024-01-01").glob("*.parquet"))
    changed = pd.read_parquet(first)
    changed["clicked"] = 1 - changed["clicked"]  # a re-delivered first day...
    changed.to_parquet(first, index=False)
    last = next((delivery / "events" / "day=2024-01-05").glob("*.parquet"))
    broken = pd.read_parquet(last)
    broken["exposed"] = broken["exposed"].astype(object)
    broken.loc[broken.index[-1], "exposed"] = None  # ...and a refused last day
    broken.to_parquet(last, index=False)
    with pytest.raises(Exception, match=r"partitioned stage failed.*day=2024-01-05"):
        run_pipeline(resources=_resources(gpl), ephemeral=True, selection=INGESTION)
    pd.testing.assert_frame_equal(events_before, wh.query("SELECT * FROM events ORDER BY request_id, item_id"))


def test_a_run_raises_no_deprecation_warning_of_ours(tmp_path, dagster_defs):
    """Our assets read the run as ``context.run`` (not the deprecated ``context.run_id``), and the deprecated
    ``InitResourceContext.dagster_run`` that Dagster reads itself when it builds our nested resources is not shown."""
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)  # the test configuration ignores them
        ignore_dagster_internal_deprecations()  # the project's own filter, in front again
        assert run_assets(dagster_defs, gpl, ["item_catalog", "users"]).success
        assert run_assets(dagster_defs, gpl, ["candidate_events", "user_histories"], partition_key="2024-01-01").success
    deprecations = [
        f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, DeprecationWarning)
    ]
    ours = [
        d
        for d in deprecations
        if d.startswith((str(ROOT / "assets"), str(ROOT / "gpl_platform"))) or "dagster_run" in d
    ]
    assert not ours, ours
