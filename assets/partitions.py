"""Daily partitions (UTC days) of the configured source, built without reading its rows.

The benchmark sources keep their fixed span. A contract directory gets partitions from
``contract.start_date`` (or the data's first day, from day-folder names or parquet statistics) to the
current UTC day, open-ended: tomorrow has one more partition without reloading the code location.
"""

from __future__ import annotations

from datetime import date, timedelta

from dagster import DailyPartitionsDefinition, PartitionsDefinition

from gpl_platform.config import Settings
from gpl_platform.data.sources import partition_span

# Dagster's run tags for a single run over a range of partitions (how single-run backfills and
# `dagster asset materialize --partition-range` tell the run its range).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"


def build_daily_partitions(settings: Settings) -> DailyPartitionsDefinition:
    start, last = partition_span(settings)
    if last is None:  # open-ended; end_offset=1 includes the current (still open) UTC day
        return DailyPartitionsDefinition(start_date=start.isoformat(), timezone="UTC", fmt="%Y-%m-%d", end_offset=1)
    # end_date is exclusive
    return DailyPartitionsDefinition(
        start_date=start.isoformat(), end_date=(last + timedelta(days=1)).isoformat(), timezone="UTC", fmt="%Y-%m-%d"
    )


def range_tags(start: str, end: str) -> dict[str, str]:
    return {PARTITION_RANGE_START_TAG: start, PARTITION_RANGE_END_TAG: end}


def partition_days(keys) -> list[date]:
    return [date.fromisoformat(k) for k in keys]


def first_day(partitions: PartitionsDefinition) -> date:
    """The first partition: per-day computations that need every earlier day start here."""
    return date.fromisoformat(partitions.get_first_partition_key())
