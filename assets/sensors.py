"""Sensors run by the daemon:

- ``new_contract_days``: watches a contract directory delivered by day folders
  (``events/day=YYYY-MM-DD/``) and requests exactly the days whose files are new or changed, through
  the daily job with its checks; a changed catalog (items/users) first runs the catalog job. The
  cursor keeps each day's content digest (sha256 of names and bytes; a file whose size and mtime are
  unchanged is not read again), so the same files delivered again request nothing. A day missing
  from the delivery follows ``contract.missing_days``.
- ``dead_run_watchdog``: marks failed the STARTED runs whose process died (assets/run_health.py).
- ``gpl_automation``: evaluates the automation conditions of assets/automation.py.
"""

import json

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DailyPartitionsDefinition,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.resources import GplSettings
from assets.run_health import fail_dead_runs
from gpl_platform.config import AutomationConfig
from gpl_platform.data.contract import ContractError
from gpl_platform.data.delivery import delivery_fingerprints

NEW_DAYS_SENSOR = "new_contract_days"
WATCHDOG_SENSOR = "dead_run_watchdog"
AUTOMATION_SENSOR = "gpl_automation"
DELIVERY_TAG = "gpl/delivery_digest"


def build_sensors(daily_job, catalog_job, partitions: DailyPartitionsDefinition, cfg: AutomationConfig) -> list:
    status = DefaultSensorStatus.RUNNING if cfg.sensors_running else DefaultSensorStatus.STOPPED

    @sensor(
        name=NEW_DAYS_SENSOR,
        jobs=[daily_job, catalog_job],
        minimum_interval_seconds=cfg.sensor_interval_s,
        default_status=status,
    )
    def new_contract_days(context: SensorEvaluationContext, gpl: GplSettings):
        """Requests the daily job for every day folder (events/day=YYYY-MM-DD/) of the contract directory
        whose content is new or changed since the last request (and the catalog job when items/users
        change); identical re-deliveries request nothing."""
        settings = gpl.settings()
        if settings.source != "contract":
            return SkipReason(f"source is {settings.source}: no deliveries to watch (the schedule runs its days)")
        state = json.loads(context.cursor) if context.cursor else {}
        try:
            digests, files = delivery_fingerprints(settings.contract.path, state.get("files"))
        except (ContractError, OSError) as exc:
            return SkipReason(f"{exc} (flat contract files: run them with `gpl run` or the daily schedule)")
        requests, counts = [], state.get("counts", {})
        seen: dict[str, str] = state.get("days", {})

        def request(what: str, digest: str, **kwargs) -> RunRequest:
            counts[what] = counts.get(what, 0) + 1
            return RunRequest(
                run_key=f"{what}@{digest[:16]}#{counts[what]}", tags={DELIVERY_TAG: digest[:16]}, **kwargs
            )

        if digests["catalog"] != state.get("catalog"):
            requests.append(request("catalog", digests["catalog"], job_name=catalog_job.name))
        deferred = []
        for day, digest in sorted((k, v) for k, v in digests.items() if k != "catalog"):
            if seen.get(day) == digest:
                continue
            if not partitions.has_partition_key(day):
                deferred.append(day)  # not a partition yet (a future day): asked again on later ticks
                continue
            requests.append(request(day, digest, job_name=daily_job.name, partition_key=day))
            seen[day] = digest
        removed = sorted(set(seen) - set(digests))
        for day in removed:
            if settings.contract.missing_days == "clear" and partitions.has_partition_key(day):
                requests.append(request(day, "removed", job_name=daily_job.name, partition_key=day))
                context.log.warning(f"{day} is missing from the delivery: re-run as an empty day (missing_days=clear)")
            else:
                context.log.warning(
                    f"{day} is missing from the delivery: its rows stay in the warehouse (missing_days=keep)"
                )
            del seen[day]
        if deferred:
            context.log.info(f"not partitions yet, asked again later: {', '.join(deferred)}")
        new_state = {
            "catalog": digests["catalog"],
            "days": seen,
            "files": files,
            "counts": counts,
            "removed": sorted(set(state.get("removed", [])) | set(removed)),
        }
        if not requests:
            return SensorResult(
                skip_reason=SkipReason(f"no new or changed day folders ({len(seen)} known)"),
                cursor=json.dumps(new_state),
            )
        context.log.info("requesting " + ", ".join(r.partition_key or "catalog" for r in requests))
        return SensorResult(run_requests=requests, cursor=json.dumps(new_state))

    @sensor(
        name=WATCHDOG_SENSOR,
        minimum_interval_seconds=cfg.watchdog_interval_s,
        default_status=DefaultSensorStatus.RUNNING,
    )  # a safety net: always on
    def dead_run_watchdog(context: SensorEvaluationContext):
        """Marks failed every STARTED run whose process died (kill -9, OOM), and every NOT_STARTED run of a
        `gpl run` killed while it planned, and frees their pool slots, so the run queue (max one run at a
        time) never blocks on them."""
        failed = fail_dead_runs(context.instance)
        return SkipReason(f"marked failed: {', '.join(failed)}" if failed else "no run with a dead process")

    automation = AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=AssetSelection.all() | AssetSelection.all_asset_checks(),
        default_status=status,
        minimum_interval_seconds=cfg.automation_interval_s,
        description="Evaluates the automation conditions (assets/automation.py): labels and features follow new "
        "days, training on its cron, the model and evaluation after training, the label audit daily.",
    )
    return [new_contract_days, dead_run_watchdog, automation]
