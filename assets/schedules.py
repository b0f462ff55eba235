"""The daily schedule, for sources that land by time: ``gpl_daily_schedule`` ticks at 02:00 UTC on
day D+1 and runs the daily job for partition D (the day that just closed), run key D (the daemon
launches a key once). A day outside the partitions (after a benchmark source's fixed span) is a
skipped tick, not a run. Created STOPPED; contract deliveries by day folders use the
``new_contract_days`` sensor instead.
"""

from datetime import UTC, timedelta

from dagster import (
    DailyPartitionsDefinition,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

DAILY_SCHEDULE = "gpl_daily_schedule"


def build_schedules(daily_job, partitions: DailyPartitionsDefinition, hour_of_day: int = 2) -> list:
    @schedule(
        name=DAILY_SCHEDULE,
        job=daily_job,
        cron_schedule=f"0 {hour_of_day} * * *",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
    )
    def gpl_daily_schedule(context: ScheduleEvaluationContext):
        """Materializes the GPL daily job (its checks included) for the UTC day that just ended."""
        now = context.scheduled_execution_time
        day = (now.astimezone(UTC) - timedelta(days=1)).date().isoformat()
        keys = partitions.get_partition_keys(current_time=now)
        if day not in keys:
            span = f"{keys[0]} .. {keys[-1]}" if keys else "none yet"
            return SkipReason(f"{day} is not a partition ({span})")
        return RunRequest(run_key=day, partition_key=day)

    return [gpl_daily_schedule]
