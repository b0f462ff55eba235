"""Daily partitions derived from the configured source's time span (UTC days)."""

from __future__ import annotations

from datetime import date, timedelta

from dagster import DailyPartitionsDefinition

from gpl_platform.config import load_settings
from gpl_platform.sources import source_day_span


def build_daily_partitions() -> DailyPartitionsDefinition:
    first, last = source_day_span(load_settings())
    # end_date is exclusive; end_offset=0 keeps the set fixed to the data's span (no "today" drift).
    return DailyPartitionsDefinition(start_date=first.isoformat(), end_date=(last + timedelta(days=1)).isoformat(),
                                     timezone="UTC", fmt="%Y-%m-%d")


daily_partitions = build_daily_partitions()


def partition_days(keys: list[str]) -> list[date]:
    return [date.fromisoformat(k) for k in keys]


def first_partition_day() -> date:
    return date.fromisoformat(daily_partitions.get_first_partition_key())
