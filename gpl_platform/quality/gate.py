"""The quality gate over the warehouse: the label and event suites re-run for any set of days, so a
consumer in a later run (training, the evaluations) can refuse the days that fail."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING

import pandas as pd

from gpl_platform.config import StreamingConfig
from gpl_platform.quality.label_suites import (
    POOLED_LABELS,
    check_pseudo_label_distribution,
    check_pseudo_label_value_chunks,
    check_pseudo_label_values,
)
from gpl_platform.quality.results import QualityGateError, QualityResult
from gpl_platform.quality.suites import check_anchors, check_embedding_chunks, check_event_chunks
from gpl_platform.thresholds import (
    AnchorThresholds,
    EmbeddingThresholds,
    EventThresholds,
    PseudoLabelThresholds,
)

if TYPE_CHECKING:
    from gpl_platform.data.warehouse import Warehouse


#: rows per chunk when the caller does not say; callers with settings pass streaming.batch_candidates
DEFAULT_CHUNK_ROWS = StreamingConfig().batch_candidates


def day_rows(con, table: str, day: date) -> int:
    (rows,) = con.execute(f"SELECT count(*) FROM {table} WHERE day = ?", [day]).fetchone()
    return int(rows)


def day_chunks(
    con,
    table: str,
    columns: Sequence[str],
    day: date,
    chunk_rows: int,
    key: str = "request_id",
    rows: int | None = None,
) -> Iterator[pd.DataFrame]:
    """``columns`` of ``table``'s rows of ``day``, about ``chunk_rows`` at a time: the rows are split by a hash of
    ``key`` into ceil(rows / chunk_rows) parts (rows sharing a key stay in one part), one query each (DuckDB
    prunes to the day and reads only ``columns``; a part's size varies by a few percent around ``chunk_rows``).
    ``rows``: the day's row count, when the caller has it (else counted here)."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = day_rows(con, table, day) if rows is None else rows
    parts = max(1, math.ceil(rows / chunk_rows))
    for part in range(parts):
        yield con.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE day = ? AND hash({key}) % ? = ?", [day, parts, part]
        ).df()


@dataclass
class LabelDay:
    """What the pseudo-label suites judge of one day: the row-level suite over every row (chunk by chunk), and
    the rows the distribution suite reads: all of them, or a uniform sample of ``sample_rows`` when the day has
    more (its statistics are then those of the sample; the metadata says so)."""

    values: QualityResult
    rows: pd.DataFrame  # the pooled labels (both in the warehouse, or pseudo_label alone), confidence
    total: int

    @property
    def sampled(self) -> bool:
        return len(self.rows) < self.total


def judge_label_days(
    days: Sequence[date], label_day: Callable[[date], LabelDay], cfg: PseudoLabelThresholds | None = None
) -> dict[date, tuple[QualityResult, QualityResult]]:
    """Both pseudo-label suites for each of ``days``; ``label_day`` gives a day's :class:`LabelDay` (the day
    before each is the KL rule's baseline, unless it fails its own gate). Two days are held at a time."""
    cfg = cfg or PseudoLabelThresholds()
    held: dict[date, LabelDay] = {}
    out = {}
    for d in sorted({pd.Timestamp(x).date() for x in days}):
        held = {k: v for k, v in held.items() if k >= d - timedelta(days=1)}
        for wanted in (d - timedelta(days=1), d):
            if wanted not in held:
                held[wanted] = label_day(wanted)
        today, previous = held[d], held[d - timedelta(days=1)]
        baseline, skip = (previous.rows if previous.total else None), None
        if baseline is not None and not (
            previous.values.passed and check_pseudo_label_distribution(previous.rows, None, cfg).passed
        ):
            # A broken previous day is no baseline: its own gate fails it; today is judged on its own.
            skip, baseline = "previous day fails its own gate (no baseline)", None
        distribution = check_pseudo_label_distribution(today.rows, baseline, cfg, kl_skip_reason=skip)
        if today.sampled:
            distribution.metadata.update(rows=today.total, distribution_sample_rows=len(today.rows))
        out[d] = (today.values, distribution)
    return out


def check_label_days(
    labels: pd.DataFrame,
    days: Sequence[date],
    cfg: PseudoLabelThresholds | None = None,
) -> dict[date, tuple[QualityResult, QualityResult]]:
    """Both pseudo-label suites for each of ``days`` over a frame with a `day` column (which may hold the
    previous days too, for the KL rule)."""
    groups = {d: g for d, g in labels.groupby("day")}

    def label_day(d: date) -> LabelDay:
        rows = groups.get(d, labels.iloc[0:0])
        return LabelDay(check_pseudo_label_values(rows, cfg), rows, len(rows))

    return judge_label_days(days, label_day, cfg)


def warehouse_label_day(
    con,
    day: date,
    cfg: PseudoLabelThresholds | None = None,
    table: str = "pseudo_labels",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LabelDay:
    """One day of ``table``: the values suite over every row, ``chunk_rows`` at a time, and the distribution's
    rows: the whole day up to ``chunk_rows`` rows, beyond it a uniform sample of that many (the rows of the
    smallest hashes of their key, a bounded top-k in DuckDB, the same sample on every run)."""
    total = day_rows(con, table, day)
    columns = (*POOLED_LABELS, "confidence")  # both pooled labels: training reads either (the gate judges what trains)
    values = check_pseudo_label_value_chunks(day_chunks(con, table, columns, day, chunk_rows, rows=total), cfg)
    sample = "" if total <= chunk_rows else f" ORDER BY hash(request_id, item_id) LIMIT {int(chunk_rows)}"
    rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE day = ?{sample}", [day]).df()
    return LabelDay(values, rows, total)


def check_label_days_in(
    warehouse: Warehouse,
    days: Sequence[date],
    cfg: PseudoLabelThresholds | None = None,
    table: str = "pseudo_labels",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[date, tuple[QualityResult, QualityResult]]:
    """Both pseudo-label suites for each of ``days`` of ``table`` in the warehouse; a chunk of one day (and the
    distribution rows of that day and the day before) in memory at a time, whatever the range (pass
    ``streaming.batch_candidates`` as ``chunk_rows``)."""
    with warehouse.connect(read_only=True) as con:
        return judge_label_days(days, lambda d: warehouse_label_day(con, d, cfg, table, chunk_rows), cfg)


def failing_label_days(
    warehouse: Warehouse,
    days: Sequence[date],
    cfg: PseudoLabelThresholds | None = None,
    table: str = "pseudo_labels",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[date, str]:
    """Days of ``days`` whose pseudo-labels (in ``table``) fail a gate, with the reason (empty: all pass)."""
    results = check_label_days_in(warehouse, days, cfg, table, chunk_rows)
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


EVENT_CHECK_COLUMNS = ("request_id", "user_id", "item_id", "event_time", "exposed", "clicked", "logging_policy")


def event_day_chunks(con, day: date, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The events of ``day`` about ``chunk_rows`` at a time, each chunk whole requests (so a repeated
    (request_id, item_id) pair is always inside one chunk)."""
    return day_chunks(con, "events", EVENT_CHECK_COLUMNS, day, chunk_rows, key="request_id")


def check_event_days(
    warehouse: Warehouse, days: Sequence[date], cfg: EventThresholds | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> dict[date, QualityResult]:
    """The events suite for each of ``days`` (an absent or empty day: the suite's empty rule). A chunk of
    about ``chunk_rows`` events of one day is in memory at a time (pass ``streaming.batch_candidates``): a
    large day's traffic would not fit as one frame."""
    days = sorted({pd.Timestamp(d).date() for d in days})
    if not days:
        return {}
    with warehouse.connect(read_only=True) as con:
        return {d: check_event_chunks(event_day_chunks(con, d, chunk_rows), cfg) for d in days}


def failing_event_days(
    warehouse: Warehouse, days: Sequence[date], cfg: EventThresholds | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> dict[date, str]:
    """Days whose events fail the events suite (implausible click or exposure rates, broken labels),
    with the reason: consumers leave them out like days failing the pseudo-label gate."""
    return {d: r.summary() for d, r in check_event_days(warehouse, days, cfg, chunk_rows).items() if not r.passed}


def check_anchor_embedding_days(
    warehouse: Warehouse,
    days: Sequence[date],
    cfg: EmbeddingThresholds | None = None,
    chunk_rows: int = StreamingConfig().encode_batch_texts,
) -> dict[date, QualityResult]:
    """The vector suite over each day of ``anchor_embeddings``, ``chunk_rows`` vectors at a time (pass
    ``streaming.encode_batch_texts``: the vectors the encoder makes at a time). Without a configured dimension,
    a day's vectors must share the day's most common one (computed in DuckDB first)."""
    cfg = cfg or EmbeddingThresholds()
    out = {}
    with warehouse.connect(read_only=True) as con:
        for d in sorted({pd.Timestamp(x).date() for x in days}):
            (common,) = con.execute("SELECT mode(len(vector)) FROM anchor_embeddings WHERE day = ?", [d]).fetchone()
            chunks = day_chunks(con, "anchor_embeddings", ("vector",), d, chunk_rows, key="anchor_id")
            out[d] = check_embedding_chunks(chunks, cfg, name="anchor_embeddings", dim=common)
    return out


ANCHOR_CHECK_COLUMNS = ("day", "user_id", "anchor_id", "anchor_text", "is_fallback", "fallback_reason", "backend")


def check_anchor_days(
    warehouse: Warehouse, days: Sequence[date], cfg: AnchorThresholds | None = None
) -> dict[date, QualityResult]:
    """The anchors suite for each of ``days``: one day's anchors and histories in memory at a time (they are per
    user, not per candidate). The days before the first day with a generated (non-fallback) anchor are the
    generator's warm-up (see :func:`~gpl_platform.quality.suites.check_anchors`)."""
    out = {}
    with warehouse.connect(read_only=True) as con:
        items = con.execute("SELECT item_id, text FROM items").df()
        (first_generated,) = con.execute(
            "SELECT min(day) FROM user_anchors WHERE NOT coalesce(is_fallback, false)"
        ).fetchone()
        for d in sorted({pd.Timestamp(x).date() for x in days}):
            anchors = con.execute(f"SELECT {', '.join(ANCHOR_CHECK_COLUMNS)} FROM user_anchors WHERE day = ?", [d]).df()
            histories = con.execute("SELECT day, user_id, history_item_ids FROM user_histories WHERE day = ?", [d]).df()
            warm_up = first_generated is None or d < first_generated
            out[d] = check_anchors(anchors, histories, items, cfg, warm_up=warm_up)
    return out
