"""Asset checks: the Great Expectations suites of gpl_platform/quality.py, run per day.

Every check evaluates each day of the run's partition(s): a single-run backfill over a range
checks every day of the range and fails naming the failing days (metadata `failing_days`, a
per-day table). The checks are not themselves partitioned (Dagster 1.13 marks partitioned checks
as a preview feature, and its UI showed a passing check of a failed run as failed); a check
executed alone from the UI, without a partition, checks every day written so far. The two pseudo-label checks are blocking: when one fails, no asset downstream of
`pseudo_labels` runs in that run (training never consumes a failing day). Consumers in later
runs use `gpl_platform.quality.require_label_days`, which re-runs the same suites.
"""


from collections.abc import Sequence
from datetime import date
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    DagsterInvariantViolationError,
    PartitionKeyRange,
    asset_check,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from assets.gpl import anchor_embeddings, item_embeddings, pseudo_labels, user_anchors
from assets.ingestion import candidate_events
from assets.metadata import span, table_md
from assets.partitions import daily_partitions, partition_days
from assets.resources import GplSettings
from gpl_platform import quality
from gpl_platform.quality import QualityResult

NUMERIC_KEYS_MAX = 12


def _days(context: AssetCheckExecutionContext, gpl: GplSettings, table: str) -> list[date]:
    """The run's partition(s); a check executed on its own without one (the UI's "Execute")
    checks every day written so far."""
    try:
        if context.has_partition_key or context.has_partition_key_range:
            return sorted(partition_days(list(context.partition_keys)))
    except DagsterInvariantViolationError:  # a run of checks only: no partitioned step to ask
        pass
    tags = context.run.tags
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start and end:
        return partition_days(list(daily_partitions.get_partition_keys_in_range(PartitionKeyRange(start, end))))
    if tags.get(PARTITION_NAME_TAG):
        return partition_days([tags[PARTITION_NAME_TAG]])
    return sorted(gpl.warehouse().written_days(table))


def _by_day(frame: pd.DataFrame) -> dict[date, pd.DataFrame]:
    if frame.empty:
        return {}
    days = pd.to_datetime(frame["day"]).dt.date
    return {d: g for d, g in frame.groupby(days.to_numpy())}


def _flat_metadata(result: QualityResult) -> dict[str, Any]:
    """Scalar metadata of one result (numbers become plottable series in the UI)."""
    out: dict[str, Any] = {}
    for key, value in result.metadata.items():
        if key in ("passed", "failed_rules", "failures") or value is None:
            continue
        if isinstance(value, bool):
            out[key] = str(value)
        elif isinstance(value, (int, float, str)):
            out[key] = value
        if len(out) >= NUMERIC_KEYS_MAX:
            break
    return out


def _check_result(context: AssetCheckExecutionContext, what: str,
                  results: dict[date | str, Sequence[QualityResult]]) -> AssetCheckResult:
    """One AssetCheckResult from the per-day results: failing days named in the description,
    a per-day table, the rule table of the first failing (or only) day."""
    rows, failing = [], {}
    for day, day_results in sorted(results.items(), key=lambda kv: str(kv[0])):
        ok = all(r.passed for r in day_results)
        reasons = [f for r in day_results for f in r.metadata.get("failures", [])]
        row = {"day": str(day), "passed": ok}
        for r in day_results:
            row.update({k: v for k, v in _flat_metadata(r).items() if k not in row})
        row["failures"] = "; ".join(reasons) or ("skipped: " + ", ".join(r.skipped for r in day_results if r.skipped)
                                                  if any(r.skipped for r in day_results) else "")
        rows.append(row)
        if not ok:
            failing[str(day)] = reasons
    passed = not failing
    keys = [str(d) for d in sorted(results, key=str)]
    if passed:
        where = f"{keys[0]}" if len(keys) == 1 else f"{len(keys)} partitions, {keys[0]} .. {keys[-1]}"
        description = f"{what}: passed ({where})" if keys else f"{what}: nothing to check"
    else:
        description = f"{what} FAILED on {len(failing)} of {len(keys)} partition(s): " + " | ".join(
            f"{day}: " + "; ".join(reasons) for day, reasons in failing.items())
        context.log.error(description)
    table = pd.DataFrame(rows)
    metadata: dict[str, Any] = {
        "failing_days": ", ".join(failing) or "none",
        "days_checked": span([date.fromisoformat(k) for k in keys]) if keys and len(keys[0]) == 10 else ", ".join(keys),
        "reason": description,
        "per_day": table_md(table, floatfmt=".4g"),
    }
    focus_day = next(iter(failing), keys[-1] if keys else None)
    if focus_day is not None:
        focus = results[next(d for d in results if str(d) == focus_day)]
        rules = pd.concat([r.table() for r in focus], ignore_index=True)
        metadata[f"rules ({focus_day})"] = table_md(rules, max_rows=60)
        if len(keys) == 1:  # single partition: scalar series the UI can plot over partitions
            for r in focus:
                metadata.update({k: v for k, v in _flat_metadata(r).items() if k not in metadata})
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.ERROR, description=description[:2000],
                            metadata=metadata)


def _range_query(gpl: GplSettings, sql: str, days: Sequence[date]) -> pd.DataFrame:
    return gpl.warehouse().query(sql + " WHERE day IN (SELECT unnest(?::DATE[]))", [list(days)])


# ---- pseudo-labels (blocking) ----------------------------------------------------------------
def _label_results(gpl: GplSettings, days: list[date]) -> dict[date, tuple[QualityResult, QualityResult]]:
    cfg = quality.quality_config(gpl.settings()).pseudo_labels
    return quality.check_label_days(quality.load_label_days(gpl.warehouse(), days), days, cfg)


@asset_check(asset=pseudo_labels, blocking=True,
             description="GX: pseudo_label and confidence present (no null/NaN) and within [0, 1], for every day of "
                         "the run. Blocking: a failing day stops every asset downstream of pseudo_labels in the run.")
def pseudo_labels_valid(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    results = _label_results(gpl, _days(context, gpl, "pseudo_labels"))
    return _check_result(context, "pseudo-label values", {d: [pair[0]] for d, pair in results.items()})


@asset_check(asset=pseudo_labels, blocking=True,
             description="GX: label mean and spread (collapsed or saturated labels fail), confidence mean and "
                         "quantiles within bounds, bounded share of high-confidence positives, KL divergence of the "
                         "confidence histogram vs the previous day under a threshold. Blocking.")
def pseudo_labels_distribution(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    results = _label_results(gpl, _days(context, gpl, "pseudo_labels"))
    return _check_result(context, "pseudo-label distribution", {d: [pair[1]] for d, pair in results.items()})


# ---- anchors, embeddings, events -------------------------------------------------------------
@asset_check(asset=user_anchors,
             description="GX: every user with a request has at least one anchor; fallback rate among users with a "
                         "history under a threshold; generated anchors mostly not verbatim history titles.")
def user_anchors_quality(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    days = _days(context, gpl, "user_anchors")
    cfg = quality.quality_config(gpl.settings()).anchors
    anchors = _by_day(_range_query(gpl, "SELECT day, user_id, anchor_id, anchor_text, is_fallback, fallback_reason, "
                                        "backend FROM user_anchors", days))
    histories = _by_day(_range_query(gpl, "SELECT day, user_id, history_item_ids FROM user_histories", days))
    items = gpl.warehouse().query("SELECT item_id, text FROM items")
    empty_a = pd.DataFrame(columns=["day", "user_id", "anchor_id", "anchor_text", "is_fallback", "fallback_reason",
                                    "backend"])
    empty_h = pd.DataFrame(columns=["day", "user_id", "history_item_ids"])
    results = {d: [quality.check_anchors(anchors.get(d, empty_a), histories.get(d, empty_h), items, cfg)]
               for d in days}
    return _check_result(context, "anchors", results)


@asset_check(asset=anchor_embeddings,
             description="GX: every anchor vector has the encoder's dimension, L2 norm ~1 and no NaN.")
def anchor_embeddings_valid(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    days = _days(context, gpl, "anchor_embeddings")
    cfg = quality.quality_config(gpl.settings()).embeddings
    frames = _by_day(_range_query(gpl, "SELECT day, vector FROM anchor_embeddings", days))
    results = {d: [quality.check_embeddings(frames.get(d, pd.DataFrame(columns=["vector"])), cfg,
                                            name="anchor_embeddings")] for d in days}
    return _check_result(context, "anchor embeddings", results)


@asset_check(asset=item_embeddings,
             description="GX: every item vector has one dimension (the encoder's), L2 norm ~1 and no NaN.")
def item_embeddings_valid(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    cfg = quality.quality_config(gpl.settings()).embeddings
    frame = gpl.warehouse().query("SELECT item_id, encoder_id, vector FROM item_embeddings")
    results = {f"encoder {enc}": [quality.check_embeddings(g, cfg, name="item_embeddings")]
               for enc, g in frame.groupby("encoder_id")} or {"all": [quality.check_embeddings(frame, cfg)]}
    return _check_result(context, "item embeddings", results)


@asset_check(asset=candidate_events,
             description="GX: the events contract (ids/times present, one row per request and item, click label "
                         "exactly on exposed rows, in {0, 1}) and exposure and positive rates within bounds.")
def candidate_events_contract(context: AssetCheckExecutionContext, gpl: GplSettings) -> AssetCheckResult:
    days = _days(context, gpl, "events")
    cfg = quality.quality_config(gpl.settings()).events
    frames = _by_day(_range_query(gpl, "SELECT day, request_id, user_id, item_id, event_time, exposed, clicked "
                                       "FROM events", days))
    empty = pd.DataFrame(columns=["request_id", "user_id", "item_id", "event_time", "exposed", "clicked"])
    results = {d: [quality.check_events(frames.get(d, empty), cfg)] for d in days}
    return _check_result(context, "candidate events", results)


#: every check of the code location (definitions.py: ``asset_checks=all_checks``)
all_checks = [pseudo_labels_valid, pseudo_labels_distribution, user_anchors_quality, anchor_embeddings_valid,
              item_embeddings_valid, candidate_events_contract]
#: the checks that gate training
blocking_checks = [pseudo_labels_valid, pseudo_labels_distribution]
