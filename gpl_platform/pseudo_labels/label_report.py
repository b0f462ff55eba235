"""The end of GPL step 4 over a range of days, inside its transaction: the degenerate-day rule (a day whose
calibration carries no ranking loses its labels) and the statistics of what was written (coverage, gaps,
distribution, a bounded sample for plots)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date

import pandas as pd

from gpl_platform.pseudo_labels.anchors.base import FALLBACK_EMPTY_HISTORY
from gpl_platform.pseudo_labels.calibration import Calibration
from gpl_platform.pseudo_labels.day_calibration import day_degenerate_reason
from gpl_platform.pseudo_labels.stage_results import LabelDistribution, LabelGaps
from gpl_platform.pseudo_labels.stages import IN_DAYS, POOLINGS, StageTables

log = logging.getLogger(__name__)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
Calibrations = dict[tuple[date, str, str], Calibration | None]  # (day, pooling, segment) -> calibration


def no_history_counts(con, days: Sequence[date]) -> dict:
    """Unexposed candidates, and (day, user) pairs, of users with no positive history on ``days``."""
    candidates, user_days = con.execute(
        "SELECT count(*) AS candidates, count(DISTINCT (e.day, e.user_id)) AS user_days FROM events e "
        "JOIN user_histories h USING (day, user_id) WHERE NOT e.exposed AND h.n_positives = 0 "
        "AND e.day BETWEEN ? AND ?",
        [min(days), max(days)],
    ).fetchall()[0]
    return {"no_history_candidates": int(candidates), "no_history_user_days": int(user_days)}


def drop_degenerate_days(
    con, tables: StageTables, labelled_days: Sequence[date], calibrations: Calibrations, min_label_std: float
) -> dict[str, str]:
    """Delete the labels of every day whose personalized labels carry no ranking in either pooling
    (:func:`day_degenerate_reason`, from the spread of the labels of users with a history); returns day -> why."""
    personal = con.execute(
        f"""
        SELECT p.day, count(*), stddev_pop(p.pseudo_label), stddev_pop(p.pseudo_label_mean_pool)
        FROM {tables.labels} p JOIN {tables.anchors} a ON a.day = p.day AND a.anchor_id = p.anchor_id
        WHERE p.{IN_DAYS} AND a.fallback_reason IS DISTINCT FROM ? GROUP BY p.day""",
        [FALLBACK_EMPTY_HISTORY],
    ).fetchall()
    spreads = {
        pd.Timestamp(d).date(): {"max": (n, s_max or 0.0), "mean": (n, s_mean or 0.0)}
        for d, n, s_max, s_mean in personal
    }
    no_labels = {pooling: (0, 0.0) for pooling in POOLINGS}
    degenerate: dict[str, str] = {}
    for d in labelled_days:
        why = day_degenerate_reason(calibrations, d, spreads.get(d, no_labels), min_label_std)
        if why:
            degenerate[str(d)] = why
            con.execute(f"DELETE FROM {tables.labels} WHERE day = ?", [d])
    if degenerate:
        log.warning(
            "%d day(s) get no pseudo-labels because their calibration carries no ranking: %s",
            len(degenerate),
            "; ".join(f"{d}: {why}" for d, why in list(degenerate.items())[:5]),
        )
    return degenerate


def label_gaps(
    con,
    tables: StageTables,
    days: Sequence[date],
    labelled_days: Sequence[date],
    no_history: str,
    degenerate: dict[str, str],
) -> LabelGaps:
    """Who got no labels on ``days`` (registered as ``_days``) and why."""
    no_history_labelled = con.execute(
        f"SELECT count(*) FROM {tables.labels} p JOIN {tables.anchors} a ON a.day = p.day AND a.anchor_id = "
        f"p.anchor_id WHERE p.{IN_DAYS} AND a.fallback_reason = ?",
        [FALLBACK_EMPTY_HISTORY],
    ).fetchall()[0][0]
    return LabelGaps(
        no_history_rule=no_history,
        **no_history_counts(con, days),
        no_history_labelled=int(no_history_labelled),
        days_without_calibration=tuple(str(d) for d in days if d not in labelled_days),
        days_with_degenerate_calibration=degenerate,
    )


def label_distribution(con, tables: StageTables, sample_rows: int) -> LabelDistribution:
    """Rows, means and quantiles of the labels of the registered ``_days``, and a hash sample of at most
    ``sample_rows`` of them."""
    labels_of_days = f"FROM {tables.labels} WHERE {IN_DAYS}"
    rows, label_mean, confidence_mean = con.execute(
        f"SELECT count(*), avg(pseudo_label), avg(confidence) {labels_of_days}"
    ).fetchall()[0]
    quantiles = (
        con.execute(
            f"SELECT unnest({list(QUANTILES)}) AS q, unnest(pl) AS pseudo_label, unnest(c) AS confidence FROM ("
            f"SELECT quantile_cont(pseudo_label, {list(QUANTILES)}) AS pl, quantile_cont(confidence, "
            f"{list(QUANTILES)}) AS c {labels_of_days})"
        ).df()
        if rows
        else None
    )
    sample = con.execute(
        f"SELECT pseudo_label, confidence {labels_of_days} "
        "ORDER BY hash(request_id, item_id), request_id, item_id LIMIT ?",
        [sample_rows],
    ).df()
    return LabelDistribution(
        rows=int(rows),
        pseudo_label_mean=float(label_mean) if rows else float("nan"),
        confidence_mean=float(confidence_mean) if rows else float("nan"),
        quantiles=quantiles.set_index("q") if quantiles is not None else None,
        sample=sample,
    )


def calibration_versions(calibrations: Calibrations) -> tuple[str, ...]:
    return tuple(sorted({c.version for c in calibrations.values() if c is not None}))
