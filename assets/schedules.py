"""Schedules. ``build_schedules(daily_job)`` is called by assets/definitions.py (importing the job
from there would be circular).

- ``gpl_daily_schedule``: from the daily-partitioned job; the tick at 02:00 UTC on day D+1 runs
  partition D (the day that just closed), with run key D (the daemon launches a key once). With
  the embedded datasets the partition set is the source's fixed span: ticks after its last day
  ask for that last day again under the same run key, so nothing new runs.
- ``label_audit_daily``: re-runs the label audit at 04:00 UTC, after the day's labels and events.
"""

from __future__ import annotations

from dagster import AssetSelection, DefaultScheduleStatus, ScheduleDefinition, build_schedule_from_partitioned_job

DAILY_SCHEDULE = "gpl_daily_schedule"
AUDIT_SCHEDULE = "label_audit_daily"


def build_schedules(job, hour_of_day: int = 2, minute_of_hour: int = 0) -> list:
    daily = build_schedule_from_partitioned_job(
        job, name=DAILY_SCHEDULE, hour_of_day=hour_of_day, minute_of_hour=minute_of_hour,
        default_status=DefaultScheduleStatus.STOPPED,
        description="Materializes the GPL daily job for the UTC day that just ended (its checks included).",
        tags={"gpl/warehouse": "write"})
    audit = ScheduleDefinition(
        name=AUDIT_SCHEDULE, cron_schedule=f"{minute_of_hour} {(hour_of_day + 2) % 24} * * *",
        execution_timezone="UTC", target=AssetSelection.assets("label_audit"),
        default_status=DefaultScheduleStatus.STOPPED,
        description="Refreshes the label audit (pseudo-labels vs later real clicks) after the daily run.",
        tags={"gpl/warehouse": "write"})
    return [daily, audit]
