"""The Dagster code location: `dagster dev -m assets.definitions` and the `gpl` CLI load this."""

from __future__ import annotations

from dagster import Definitions, define_asset_job, in_process_executor, load_assets_from_modules

from assets import gpl, ingestion, training
from assets.audit import audit_assets
from assets.checks import all_checks
from assets.features import feature_assets
from assets.schedules import build_schedules
from assets.partitions import daily_partitions
from assets.resources import GplSettings

all_assets = [*load_assets_from_modules([ingestion, gpl, training]), *feature_assets, *audit_assets]

# One process per run: steps share the loaded models and data, and only one process at a time
# opens the DuckDB file for writing (dagster.yaml also queues runs one at a time).
daily_job = define_asset_job("gpl_daily", selection=[a.key for a in all_assets if a.partitions_def is not None],
                             partitions_def=daily_partitions, executor_def=in_process_executor)

defs = Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[daily_job],
    schedules=build_schedules(daily_job),
    resources={"gpl": GplSettings()},
    executor=in_process_executor,
)
