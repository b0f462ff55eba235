"""Declarative automation (executed by the daemon's automation sensor, shown on each asset's
Automation tab):

- partitioned assets follow their upstream partitions on the latest day (``eager``): after day D's
  run, tomorrow's features and calibration are ready; the checks run with their asset (not again
  after a run that already checked it);
- unpartitioned assets derived from the catalog follow it (``eager``);
- ``training_set`` refreshes at the first tick of ``automation.training_cron`` after its labels got
  new days;
  ``prerank_model`` follows training and ``offline_evaluation`` follows the model;
- ``label_audit`` refreshes the same way on ``automation.audit_cron``.

New days themselves arrive through the ``new_contract_days`` sensor or the daily schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import AssetSelection, AutomationCondition

from gpl_platform.config import AutomationConfig


@dataclass(frozen=True)
class Automation:
    follow_upstream: AutomationCondition
    follow_catalog: AutomationCondition
    #: checks run with their asset when automation requests it (the jobs and gpl run include them anyway)
    with_asset: AutomationCondition
    training: AutomationCondition
    audit: AutomationCondition

    @staticmethod
    def after(asset_key: str) -> AutomationCondition:
        """Runs when ``asset_key`` (one of the deps) was updated, ignoring the other deps: an
        unpartitioned consumer of partitioned assets always has missing upstream days."""
        return (
            AutomationCondition.any_deps_updated().allow(AssetSelection.assets(asset_key)).since_last_handled()
            & ~AutomationCondition.any_deps_in_progress()
            & ~AutomationCondition.in_progress()
        ).with_label(f"after {asset_key}")


def build_automation(cfg: AutomationConfig) -> Automation:
    return Automation(
        # The latest day only: the daily job (sensor, schedule) materializes whole days, so this is what
        # follows a day's run: today's features and calibration once yesterday's events are in, and a
        # partial re-run of the latest day from the UI. Older days: re-run them (a backfill) instead of a
        # cascade of single-asset runs (seen: one changed day queued a dozen of them).
        follow_upstream=AutomationCondition.eager(),
        follow_catalog=AutomationCondition.eager(),
        with_asset=AutomationCondition.any_deps_match(AutomationCondition.will_be_requested()).with_label(
            "with its asset"
        ),
        training=on_cron_after_new_data(cfg.training_cron),
        audit=on_cron_after_new_data(cfg.audit_cron),
    )


def on_cron_after_new_data(cron: str) -> AutomationCondition:
    """At the first evaluation after a tick of ``cron``, when a dependency was updated since the asset
    was last requested or updated, and no dependency is being written. (Dagster's ``on_cron`` waits for
    updates *after* the tick: a day that arrived between two ticks would wait for the next delivery.)"""
    return (
        AutomationCondition.cron_tick_passed(cron, "UTC").since_last_handled()
        & AutomationCondition.any_deps_updated().since_last_handled()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label(f"on {cron} (UTC) after new data")
