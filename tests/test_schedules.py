"""The daily schedule built from the partitioned job, and the label-audit schedule."""

from datetime import datetime, timezone

from dagster import DagsterInstance, Definitions, build_schedule_context

from assets.audit import audit_assets
from assets.checks import all_checks
from assets.definitions import all_assets, daily_job
from assets.resources import GplSettings
from assets.schedules import AUDIT_SCHEDULE, DAILY_SCHEDULE, build_schedules


def _defs():
    return Definitions(assets=[*all_assets, *audit_assets], asset_checks=all_checks, jobs=[daily_job],
                       schedules=build_schedules(daily_job), resources={"gpl": GplSettings()})


def test_schedules_resolve():
    repo = _defs().get_repository_def()
    daily = repo.get_schedule_def(DAILY_SCHEDULE)
    assert daily.job_name == "gpl_daily"
    assert daily.cron_schedule == "0 2 * * *" and daily.execution_timezone == "UTC"
    audit = repo.get_schedule_def(AUDIT_SCHEDULE)
    assert audit.cron_schedule == "0 4 * * *"
    assert {k.to_user_string() for k in repo.get_job(audit.job_name).asset_layer.executable_asset_keys} == {"label_audit"}


def _tick(schedule, when: datetime):
    with DagsterInstance.ephemeral() as instance:
        context = build_schedule_context(instance=instance, scheduled_execution_time=when)
        return schedule.evaluate_tick(context)


def test_daily_tick_runs_the_day_that_just_ended():
    daily = _defs().get_repository_def().get_schedule_def(DAILY_SCHEDULE)
    result = _tick(daily, datetime(2024, 1, 3, 2, 0, tzinfo=timezone.utc))
    assert [r.partition_key for r in result.run_requests] == ["2024-01-02"]
    assert result.run_requests[0].tags.get("gpl/warehouse") == "write"  # dagster.yaml serializes these runs
    assert result.run_requests[0].run_key == "2024-01-02"  # the daemon never launches one key twice
    # After the source's last day (conftest: 2024-01-01..05) ticks ask for that last day again,
    # under the same run key: the daemon skips it, so nothing new runs.
    late = _tick(daily, datetime(2024, 2, 1, 2, 0, tzinfo=timezone.utc))
    assert [(r.partition_key, r.run_key) for r in late.run_requests] == [("2024-01-05", "2024-01-05")]
