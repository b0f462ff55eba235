"""The asset graph from a settings value: every asset, check, job, schedule, sensor and resource, built in
one place by ``build_definitions(settings, gpl)``. The code location (`assets/definitions.py`) builds it
from the environment; `gpl run` (assets/runner.py) from the settings the command was given; tests build
their own.

Building reads the settings but never the data: the partitions of a contract source come from its
configuration, day-folder names or parquet statistics (assets/partitions.py).
"""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from assets.automation import build_automation
from assets.checks import build_checks
from assets.features import feature_assets
from assets.gpl import gpl_assets
from assets.gpl_ablation import ablation_assets
from assets.ingestion import ingestion_assets
from assets.partitions import build_daily_partitions
from assets.quality import quality_assets
from assets.resources import GplSettings, gpl_resources
from assets.schedules import build_schedules
from assets.sensors import build_sensors
from assets.training import training_assets
from gpl_platform.config import Settings

#: the assets from delivered events to pseudo-labels, in order: ingestion, then GPL's labelling chain
LABELLING_ASSETS = (
    "item_catalog",
    "users",
    "candidate_events",
    "user_histories",
    "item_embeddings",
    "user_anchors",
    "anchor_embeddings",
    "candidate_similarities",
    "similarity_calibration",
    "pseudo_labels",
)
DAILY_JOB = "gpl_daily"
CATALOG_JOB = "gpl_catalog"


def build_definitions(settings: Settings | None = None, gpl: GplSettings | None = None) -> Definitions:
    """Every asset, check, job, schedule, sensor and resource of the project. ``settings`` decides the
    partitions and the automation cadence; ``gpl`` is the settings resource the runs use (default: one
    that gives ``settings``). Neither given: the environment's."""
    if gpl is None:
        gpl = GplSettings.from_settings(settings) if settings is not None else GplSettings()
    settings = settings or gpl.settings()
    partitions = build_daily_partitions(settings)
    automation = build_automation(settings.automation)
    assets = [
        *ingestion_assets(partitions, automation),
        *gpl_assets(partitions, automation, settings.calibration),
        *ablation_assets(partitions, automation),
        *feature_assets(partitions, automation),
        *training_assets(automation),
        *quality_assets(automation),
    ]
    partitioned = AssetSelection.assets(*[a for a in assets if a.partitions_def is not None])
    # One process per run: steps share the loaded models and data (and every asset is in the
    # duckdb_warehouse pool: one writer at a time, whoever starts the run).
    daily_job = define_asset_job(
        DAILY_JOB,
        selection=partitioned,  # its partitions are the selected assets' (Dagster infers them)
        executor_def=in_process_executor,
        description="Every per-day asset of one day (or a range), with its checks.",
    )
    catalog_job = define_asset_job(
        CATALOG_JOB,
        selection=AssetSelection.all() - partitioned.downstream(),
        executor_def=in_process_executor,
        description="The unpartitioned assets the days build on: catalog, users, item "
        "vectors, semantic IDs, profile features, the Feast registry.",
    )
    return Definitions(
        assets=assets,
        asset_checks=build_checks(partitions, automation),
        jobs=[daily_job, catalog_job],
        schedules=build_schedules(daily_job, partitions),
        sensors=build_sensors(daily_job, catalog_job, partitions, settings.automation),
        resources=gpl_resources(gpl),
        executor=in_process_executor,
    )
