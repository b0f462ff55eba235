"""The quality gate over the warehouse: the label and event suites re-run for any set of days, so a
consumer in a later run (training, the evaluations) can refuse the days that fail."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING

import pandas as pd

from gpl_platform.quality.results import QualityGateError, QualityResult
from gpl_platform.quality.suites import check_events, check_pseudo_label_distribution, check_pseudo_label_values
from gpl_platform.quality.thresholds import EventThresholds, PseudoLabelThresholds

if TYPE_CHECKING:
    from gpl_platform.data.warehouse import Warehouse


def load_label_days(
    warehouse: Warehouse, days: Sequence[date], with_previous: bool = True, table: str = "pseudo_labels"
) -> pd.DataFrame:
    """pseudo_label/confidence of ``days`` (and of the day before each, for the KL rule)."""
    wanted = {pd.Timestamp(d).date() for d in days}
    if with_previous:
        wanted |= {d - timedelta(days=1) for d in list(wanted)}
    frame = warehouse.query(
        f"SELECT day, pseudo_label, confidence FROM {table} WHERE day IN (SELECT unnest(?::DATE[]))", [sorted(wanted)]
    )
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame


def check_label_days(
    labels: pd.DataFrame,
    days: Sequence[date],
    cfg: PseudoLabelThresholds | None = None,
) -> dict[date, tuple[QualityResult, QualityResult]]:
    """Both pseudo-label suites for each of ``days``; ``labels`` has a `day` column and may hold
    the previous days too (used for the KL rule)."""
    cfg = cfg or PseudoLabelThresholds()
    groups = {d: g for d, g in labels.groupby("day")}
    empty = labels.iloc[0:0]
    out = {}
    for d in sorted({pd.Timestamp(x).date() for x in days}):
        today = groups.get(d, empty)
        previous = groups.get(d - timedelta(days=1))
        skip = None
        if previous is not None and len(previous) and not _baseline_ok(previous, cfg):
            # A broken previous day is no baseline: its own gate fails it; today is judged on its own.
            skip, previous = "previous day fails its own gate (no baseline)", None
        out[d] = (
            check_pseudo_label_values(today, cfg),
            check_pseudo_label_distribution(today, previous, cfg, kl_skip_reason=skip),
        )
    return out


def _baseline_ok(previous: pd.DataFrame, cfg: PseudoLabelThresholds) -> bool:
    return (
        check_pseudo_label_values(previous, cfg).passed and check_pseudo_label_distribution(previous, None, cfg).passed
    )


def failing_label_days(
    warehouse: Warehouse, days: Sequence[date], cfg: PseudoLabelThresholds | None = None, table: str = "pseudo_labels"
) -> dict[date, str]:
    """Days of ``days`` whose pseudo-labels (in ``table``) fail a gate, with the reason (empty: all pass).
    A day and the day before it are in memory at a time: a training range of labels would not fit."""
    results = {}
    for d in sorted({pd.Timestamp(x).date() for x in days}):
        results.update(check_label_days(load_label_days(warehouse, [d], table=table), [d], cfg))
    return {
        d: "; ".join(r.summary() for r in pair if not r.passed)
        for d, pair in results.items()
        if not all(r.passed for r in pair)
    }


def require_label_days(warehouse: Warehouse, days: Sequence[date], cfg: PseudoLabelThresholds | None = None) -> None:
    """For consumers of pseudo-labels in later runs (training): raise if any day fails the gate."""
    failing = failing_label_days(warehouse, days, cfg)
    if failing:
        raise QualityGateError(
            "pseudo-labels of these days failed the quality gate and must not be consumed:\n"
            + "\n".join(f"  {d}: {why}" for d, why in sorted(failing.items()))
        )


EVENT_CHECK_COLUMNS = ("request_id", "user_id", "item_id", "event_time", "exposed", "clicked")


def check_event_days(
    warehouse: Warehouse, days: Sequence[date], cfg: EventThresholds | None = None
) -> dict[date, QualityResult]:
    """The events suite for each of ``days`` (an absent or empty day: the suite's empty rule). One day's
    events are in memory at a time: a range of a large day's traffic would not fit."""
    days = sorted({pd.Timestamp(d).date() for d in days})
    columns = ", ".join(EVENT_CHECK_COLUMNS)
    if not days:
        return {}
    with warehouse.connect(read_only=True) as con:
        return {
            d: check_events(con.execute(f"SELECT {columns} FROM events WHERE day = ?", [d]).df(), cfg) for d in days
        }


def failing_event_days(
    warehouse: Warehouse, days: Sequence[date], cfg: EventThresholds | None = None
) -> dict[date, str]:
    """Days whose events fail the events suite (implausible click or exposure rates, broken labels),
    with the reason: consumers leave them out like days failing the pseudo-label gate."""
    return {d: r.summary() for d, r in check_event_days(warehouse, days, cfg).items() if not r.passed}
