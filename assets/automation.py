"""Declarative automation (executed by the daemon's automation sensor, shown on each asset's
Automation tab):

- partitioned assets and their per-day checks follow their upstream partitions (``eager`` over the
  latest ``automation.follow_lookback_days`` days instead of the latest day only);
- unpartitioned assets derived from the catalog follow it (``eager``);
- ``training_set`` refreshes on ``automation.training_cron`` once its labels have new days;
  ``prerank_model`` follows training and ``offline_evaluation`` follows the model;
- ``label_audit`` refreshes on ``automation.audit_cron``.

New days themselves arrive through the ``new_contract_days`` sensor or the daily schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from dagster import AssetSelection, AutomationCondition

from gpl_platform.config import AutomationConfig


@dataclass(frozen=True)
class Automation:
    follow_upstream: AutomationCondition
    follow_catalog: AutomationCondition
    training: AutomationCondition
    audit: AutomationCondition

    @staticmethod
    def after(asset_key: str) -> AutomationCondition:
        """Runs when ``asset_key`` (one of the deps) was updated, ignoring the other deps: an
        unpartitioned consumer of partitioned assets always has missing upstream days."""
        return (AutomationCondition.any_deps_updated().allow(AssetSelection.assets(asset_key)).since_last_handled()
                & ~AutomationCondition.any_deps_in_progress()
                & ~AutomationCondition.in_progress()).with_label(f"after {asset_key}")


def build_automation(cfg: AutomationConfig) -> Automation:
    lookback = AutomationCondition.in_latest_time_window(timedelta(days=cfg.follow_lookback_days))
    return Automation(
        follow_upstream=AutomationCondition.eager().replace("in_latest_time_window", lookback)
        .with_label(f"eager, latest {cfg.follow_lookback_days} days"),
        follow_catalog=AutomationCondition.eager(),
        training=AutomationCondition.on_cron(cfg.training_cron, "UTC"),
        audit=AutomationCondition.on_cron(cfg.audit_cron, "UTC"),
    )
