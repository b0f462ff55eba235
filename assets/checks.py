"""Asset checks: the Great Expectations suites of gpl_platform/quality/ (suites and gate), one result per day.

The per-day checks are partitioned like their assets and record one evaluation per partition, also
in a single run over a range of days (a single-run backfill, ``gpl run``): the UI's partition view of
a check shows which days passed and which failed, each with its reasons and rule table. The two
pseudo-label checks are blocking: when one fails on any day of the run, no asset downstream of
`pseudo_labels` runs in that run. Consumers in later runs (training_set, the evaluation) re-run the
same suites through `gpl_platform.quality.gate` and leave failing days out.
"""

import warnings
from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    DailyPartitionsDefinition,
    Output,
    asset_check,
)

from assets.automation import Automation
from assets.ingestion import POOL
from assets.metadata import span, table_md
from assets.partitions import partition_days
from assets.resources import GplSettings, WarehouseResource
from gpl_platform.quality.gate import (
    check_anchor_days,
    check_anchor_embedding_days,
    check_event_days,
    check_label_days_in,
)
from gpl_platform.quality.results import QualityResult
from gpl_platform.quality.suites import check_embeddings
from gpl_platform.thresholds import quality_config

NUMERIC_KEYS_MAX = 16  # the distribution suite reports both pooled labels


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


def _reasons(results: Sequence[QualityResult]) -> list[str]:
    return [f for r in results for f in r.metadata.get("failures", [])]


def _day_description(what: str, day: str, results: Sequence[QualityResult]) -> str:
    if all(r.passed for r in results):
        skipped = [r.skipped for r in results if r.skipped]
        return f"{what}: passed ({day})" + (f", skipped: {', '.join(skipped)}" if skipped else "")
    return f"{what} FAILED on {day}: " + "; ".join(_reasons(results))


def _day_metadata(day: str, results: Sequence[QualityResult]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"day": day, "reason": "; ".join(_reasons(results)) or "passed"}
    for r in results:
        metadata.update({k: v for k, v in _flat_metadata(r).items() if k not in metadata})
    metadata["rules"] = table_md(pd.concat([r.table() for r in results], ignore_index=True), max_rows=60)
    return metadata


def per_day_evaluations(
    context: AssetCheckExecutionContext,
    asset: str,
    check: str,
    blocking: bool,
    what: str,
    results: dict[date, Sequence[QualityResult]],
) -> Iterator:
    """One evaluation per partition (its reasons, rule table and statistics), an ERROR log line naming
    the failing days, then the check's output."""
    failing = []
    for day, day_results in sorted(results.items()):
        key = day.isoformat()
        passed = all(r.passed for r in day_results)
        if not passed:
            failing.append(f"{key}: " + "; ".join(_reasons(day_results)))
        yield AssetCheckEvaluation(
            asset_key=AssetKey(asset),
            check_name=check,
            passed=passed,
            severity=AssetCheckSeverity.ERROR,
            blocking=blocking,
            partition=key,
            description=_day_description(what, key, day_results)[:2000],
            metadata=_day_metadata(key, day_results),
        )
    if failing:
        context.log.error(f"{what} FAILED on {len(failing)} of {len(results)} partition(s): " + " | ".join(failing))
    else:
        context.log.info(f"{what}: passed on {span(list(results))}")
    yield Output(None)  # the check's own output: blocking checks gate downstream steps on it


def _run_days(context: AssetCheckExecutionContext) -> list[date]:
    return sorted(partition_days(context.partition_keys))


def build_checks(partitions: DailyPartitionsDefinition, automation: Automation) -> list:
    with warnings.catch_warnings():
        # Partitioned asset checks are a Dagster 1.13 preview: the per-partition results are what the UI
        # needs to show which day failed (tests/orchestration/test_quality_dagster.py pins the behaviour we rely on).
        warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")
        return _build_checks(partitions, automation)


def _build_checks(partitions: DailyPartitionsDefinition, automation: Automation) -> list:
    per_day = {"partitions_def": partitions, "pool": POOL, "automation_condition": automation.with_asset}

    def label_results(gpl: GplSettings, warehouse: WarehouseResource, days: list[date]):
        settings = gpl.settings()
        return check_label_days_in(
            warehouse.get(),
            days,
            quality_config(settings).pseudo_labels,
            chunk_rows=settings.streaming.batch_candidates,
        )

    @asset_check(asset="pseudo_labels", blocking=True, **per_day)
    def pseudo_labels_valid(context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource):
        """GX: pseudo_label and confidence present (no null/NaN) and within [0, 1], for every day of the
        run. Blocking: a failing day stops every asset downstream of pseudo_labels in the run."""
        results = label_results(gpl, warehouse, _run_days(context))
        yield from per_day_evaluations(
            context,
            "pseudo_labels",
            "pseudo_labels_valid",
            True,
            "pseudo-label values",
            {d: [pair[0]] for d, pair in results.items()},
        )

    @asset_check(asset="pseudo_labels", blocking=True, **per_day)
    def pseudo_labels_distribution(context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource):
        """GX: label mean and spread (collapsed or saturated labels fail), confidence mean and quantiles
        within bounds, bounded share of high-confidence positives, KL divergence of the confidence
        histogram vs the previous day under a threshold. Blocking."""
        results = label_results(gpl, warehouse, _run_days(context))
        yield from per_day_evaluations(
            context,
            "pseudo_labels",
            "pseudo_labels_distribution",
            True,
            "pseudo-label distribution",
            {d: [pair[1]] for d, pair in results.items()},
        )

    @asset_check(asset="user_anchors", **per_day)
    def user_anchors_quality(context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource):
        """GX: every user with a request has at least one anchor; fallback rate among users with a history
        under a threshold; generated anchors mostly not verbatim history titles."""
        results = {
            d: [r]
            for d, r in check_anchor_days(
                warehouse.get(), _run_days(context), quality_config(gpl.settings()).anchors
            ).items()
        }
        yield from per_day_evaluations(context, "user_anchors", "user_anchors_quality", False, "anchors", results)

    @asset_check(asset="anchor_embeddings", **per_day)
    def anchor_embeddings_valid(context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource):
        """GX: every anchor vector has the encoder's dimension, L2 norm ~1 and no NaN."""
        settings = gpl.settings()
        results = {
            d: [r]
            for d, r in check_anchor_embedding_days(
                warehouse.get(),
                _run_days(context),
                quality_config(settings).embeddings,
                settings.streaming.encode_batch_texts,
            ).items()
        }
        yield from per_day_evaluations(
            context, "anchor_embeddings", "anchor_embeddings_valid", False, "anchor embeddings", results
        )

    @asset_check(asset="candidate_events", **per_day)
    def candidate_events_contract(context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource):
        """GX: the events contract (ids/times present, one row per request and item, click label exactly on
        exposed rows, in {0, 1}) and plausible exposure and click rates. A failing day is left out of
        training (training_set re-runs this suite)."""
        settings = gpl.settings()
        results = check_event_days(
            warehouse.get(), _run_days(context), quality_config(settings).events, settings.streaming.batch_candidates
        )
        yield from per_day_evaluations(
            context,
            "candidate_events",
            "candidate_events_contract",
            False,
            "candidate events",
            {d: [r] for d, r in results.items()},
        )

    @asset_check(asset="item_embeddings", pool=POOL, automation_condition=automation.with_asset)
    def item_embeddings_valid(
        context: AssetCheckExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> AssetCheckResult:
        """GX: every item vector has one dimension (the encoder's), L2 norm ~1 and no NaN."""
        cfg = quality_config(gpl.settings()).embeddings
        frame = warehouse.get().query("SELECT item_id, encoder_id, vector FROM item_embeddings")
        results = {
            f"encoder {enc}": check_embeddings(g, cfg, name="item_embeddings") for enc, g in frame.groupby("encoder_id")
        } or {"all": check_embeddings(frame, cfg)}
        passed = all(r.passed for r in results.values())
        description = "item embeddings: " + (
            "passed"
            if passed
            else "FAILED: "
            + " | ".join(f"{k}: " + "; ".join(_reasons([r])) for k, r in results.items() if not r.passed)
        )
        if not passed:
            context.log.error(description)
        focus = next((r for r in results.values() if not r.passed), next(iter(results.values())))
        return AssetCheckResult(
            passed=passed,
            severity=AssetCheckSeverity.ERROR,
            description=description[:2000],
            metadata={
                "encoders": ", ".join(results),
                **_flat_metadata(focus),
                "rules": table_md(focus.table(), max_rows=60),
            },
        )

    return [
        pseudo_labels_valid,
        pseudo_labels_distribution,
        user_anchors_quality,
        anchor_embeddings_valid,
        candidate_events_contract,
        item_embeddings_valid,
    ]
