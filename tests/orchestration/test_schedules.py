"""The daily schedule: it requests the UTC day that just ended, and skips days outside the partitions."""

from datetime import UTC, datetime

from dagster import DagsterInstance, SkipReason, build_schedule_context

from assets.schedules import DAILY_SCHEDULE


def _tick(defs, when: datetime):
    repo = defs.get_repository_def()
    with DagsterInstance.ephemeral() as instance:
        context = build_schedule_context(instance=instance, scheduled_execution_time=when, repository_def=repo)
        return repo.get_schedule_def(DAILY_SCHEDULE).evaluate_tick(context)


def test_schedule_resolves(dagster_defs):
    daily = dagster_defs.get_repository_def().get_schedule_def(DAILY_SCHEDULE)
    assert daily.job_name == "gpl_daily"
    assert daily.cron_schedule == "0 2 * * *" and daily.execution_timezone == "UTC"


def test_daily_tick_runs_the_day_that_just_ended(dagster_defs):
    result = _tick(dagster_defs, datetime(2024, 1, 3, 2, 0, tzinfo=UTC))
    assert [r.partition_key for r in result.run_requests] == ["2024-01-02"]
    assert result.run_requests[0].run_key == "2024-01-02"  # the daemon never launches one key twice
    # After the source's last day (the test world: 2024-01-01..05) a tick is skipped, not a re-run of the
    # last day: nothing new to do, and the tick says why.
    late = _tick(dagster_defs, datetime(2024, 2, 1, 2, 0, tzinfo=UTC))
    assert not late.run_requests and "2024-01-31 is not a partition (2024-01-01 .. 2024-01-05)" in late.skip_message
    assert isinstance(SkipReason(late.skip_message), SkipReason)
