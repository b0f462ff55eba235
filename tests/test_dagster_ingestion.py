"""In-process Dagster materializations of the ingestion assets on simulator data."""

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets.definitions import all_assets, defs
from assets.partitions import daily_partitions
from assets.resources import GplSettings
from assets.runner import run_pipeline
from gpl_platform.stats import export_contract_dir
from gpl_platform.warehouse import Warehouse

INGESTION = ["item_catalog", "users", "candidate_events", "user_histories"]


def test_definitions_load_with_partitions_from_the_source_span():
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert set(INGESTION) <= keys
    # conftest: simulator with 5 days from 2024-01-01
    assert daily_partitions.get_partition_keys() == [f"2024-01-0{d}" for d in range(1, 6)]
    assert defs.resolve_job_def("gpl_daily") is not None


def _count(wh, table):
    return int(wh.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0])


def test_materialize_partitions_and_rematerialize_idempotently(tmp_path):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    resources = {"gpl": gpl}
    instance = DagsterInstance.ephemeral()
    assert materialize(all_assets, selection=["item_catalog", "users"], resources=resources, instance=instance).success
    for key in ("2024-01-01", "2024-01-02"):
        result = materialize(all_assets, selection=["candidate_events", "user_histories"], partition_key=key,
                             resources=resources, instance=instance)
        assert result.success
    wh = gpl.warehouse()
    events_before, hist_before = _count(wh, "events"), _count(wh, "user_histories")
    assert events_before > 0 and hist_before > 0
    # Again, twice: replaced, not duplicated.
    for _ in range(2):
        assert materialize(all_assets, selection=["candidate_events", "user_histories"], partition_key="2024-01-02",
                           resources=resources, instance=instance).success
    assert (_count(wh, "events"), _count(wh, "user_histories")) == (events_before, hist_before)
    mats = instance.fetch_materializations(AssetKey("candidate_events"), limit=10).records
    meta = mats[0].asset_materialization.metadata
    assert meta["partition_span"].value.startswith("2024-01-02")
    assert 0 < meta["exposure_rate"].value < 1


def test_histories_before_events_fail_with_a_clear_error(tmp_path):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()
    materialize(all_assets, selection=["item_catalog", "users"], resources={"gpl": gpl}, instance=instance)
    materialize(all_assets, selection=["candidate_events"], partition_key="2024-01-03",
                resources={"gpl": gpl}, instance=instance)
    result = materialize(all_assets, selection=["user_histories"], partition_key="2024-01-03",
                         resources={"gpl": gpl}, instance=instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    text = failure.to_string()
    assert "MissingUpstreamDays" in text and "not ingested" in text and "2024-01-01" in text


def test_range_run_and_failed_rerun_keeps_previous_data(tmp_path, settings):
    """One run covers the whole range; a later run on bad input fails whole and changes nothing."""
    from gpl_platform.sources import load_source

    contract_dir = tmp_path / "contract"
    export_contract_dir(load_source(settings), contract_dir)
    gpl = GplSettings(source="contract", contract_path=str(contract_dir), data_dir=str(tmp_path / "data"))
    result = run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=INGESTION)
    assert result.success and len(result.runs) == 2  # unpartitioned + one run for all 5 days
    wh = gpl.warehouse()
    before = wh.query("SELECT * FROM events ORDER BY request_id, item_id")
    assert wh.query("SELECT count(DISTINCT day) AS n FROM events")["n"].iloc[0] == 5

    events = pd.read_parquet(contract_dir / "events.parquet")
    events.loc[events.index[-3:], "item_id"] = ["unknown-1", "unknown-2", "unknown-3"]
    events.to_parquet(contract_dir / "events.parquet", index=False)
    with pytest.raises(Exception, match="missing from the items table"):
        run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=INGESTION)
    after = wh.query("SELECT * FROM events ORDER BY request_id, item_id")
    pd.testing.assert_frame_equal(before, after)


def test_run_config_overrides_settings(tmp_path):
    gpl = GplSettings(data_dir=str(tmp_path / "d"), seed=7, overrides_json='{"simulator": {"n_users": 11}}')
    s = gpl.settings()
    assert (s.seed, s.simulator.n_users, s.simulator.n_items) == (7, 11, 300)
    assert s.warehouse == (tmp_path / "d" / "warehouse.duckdb").resolve()
    assert isinstance(gpl.warehouse(), Warehouse)
