"""Ingestion into the warehouse: catalog, users, per-day events, per-day user histories."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import date, timedelta

import pandas as pd

from gpl_platform.data.contract import Dataset
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse

log = logging.getLogger(__name__)


def ingest_catalog(warehouse: Warehouse, dataset: Dataset, signature: dict) -> dict:
    """Replace the `items` and `users` tables with the dataset's (one transaction)."""
    with warehouse.transaction() as con:
        warehouse.claim_source(signature, con)
        n_items = warehouse.replace_table("items", dataset.items, con)
        n_users = warehouse.replace_table("users", dataset.users, con)
    text_len = dataset.items["text"].str.len()
    return {"n_items": n_items, "n_users": n_users, "text_chars_median": float(text_len.median()),
            "item_columns": list(dataset.items.columns), "user_columns": list(dataset.users.columns)}


def ingest_event_days(warehouse: Warehouse, dataset: Dataset, days: Sequence[date], signature: dict,
                      run_id: str | None = None) -> pd.DataFrame:
    """Replace the events (and, apart, the oracle labels) of ``days``; returns per-day statistics."""
    days = sorted(set(days))
    selected = dataset.events[dataset.events["day"].isin(days)]
    events = selected[["day", "request_id", "user_id", "item_id", "event_time", "exposed", "clicked", "propensity"]]
    oracle = selected[["day", "request_id", "item_id", "oracle_label"]]
    with warehouse.transaction() as con:
        warehouse.claim_source(signature, con)
        warehouse.replace_partitions("events", events, days, con, run_id)
        warehouse.replace_partitions("oracle_labels", oracle, days, con, run_id)
    return event_day_stats(selected, days)


def event_day_stats(events: pd.DataFrame, days: Sequence[date]) -> pd.DataFrame:
    """Rows, requests, exposure and positive rates per day (zero rows for empty days)."""
    frame = events.assign(
        clicked_f=events["clicked"].astype("Float64"),
        oracle_unexposed=events["oracle_label"].astype("Float64").where(~events["exposed"]),
    )
    stats = frame.groupby("day").agg(
        events=("item_id", "size"), requests=("request_id", "nunique"), users=("user_id", "nunique"),
        exposure_rate=("exposed", "mean"), ctr_exposed=("clicked_f", "mean"),
        oracle_positive_rate_unexposed=("oracle_unexposed", "mean"),
    )
    stats = stats.reindex(sorted(set(days)))
    stats[["events", "requests", "users"]] = stats[["events", "requests", "users"]].fillna(0).astype(int)
    stats.index.name = "day"
    return stats


def build_user_histories(warehouse: Warehouse, days: Sequence[date], first_day: date, max_len: int,
                         run_id: str | None = None) -> pd.DataFrame:
    """Per day D, for each user with a request on D: their clicked items strictly before D (UTC),
    most recent first, at most ``max_len``. Needs the events of every day in [first_day, D)."""
    days = sorted(set(days))
    written = warehouse.written_days("events")
    needed = {first_day + timedelta(n) for n in range((max(days) - first_day).days + 1)}
    missing = sorted(needed - written)
    if missing:
        raise MissingUpstreamDays(
            f"user histories for {days[0]}..{days[-1]} need the events of every earlier day, but "
            f"{len(missing)} day(s) are not ingested (first: {missing[0]}, last: {missing[-1]}). "
            "Materialize candidate_events for those partitions first.")
    with warehouse.transaction() as con:
        con.register("_days", pd.DataFrame({"day": pd.to_datetime(pd.Series(days, dtype="object"))}))
        histories = con.execute(
            """
            WITH req AS (
                SELECT DISTINCT e.day, e.user_id FROM events e
                WHERE e.day IN (SELECT CAST(day AS DATE) FROM _days)
            ), latest AS (  -- a re-clicked item counts once, at its latest click before D
                SELECT r.day, r.user_id, e.item_id, max(e.event_time) AS event_time
                FROM req r JOIN events e ON e.user_id = r.user_id AND e.exposed AND e.clicked = 1 AND e.day < r.day
                GROUP BY r.day, r.user_id, e.item_id
            ), per_day AS (
                SELECT *, row_number() OVER (PARTITION BY day, user_id ORDER BY event_time DESC, item_id) AS rn
                FROM latest
            )
            SELECT r.day, r.user_id,
                   coalesce(list(h.item_id ORDER BY h.rn) FILTER (WHERE h.rn <= ?), []::VARCHAR[]) AS history_item_ids,
                   count(h.item_id)::INTEGER AS n_positives,
                   max(h.event_time) AS last_positive_time
            FROM req r LEFT JOIN per_day h ON h.day = r.day AND h.user_id = r.user_id
            GROUP BY r.day, r.user_id ORDER BY r.day, r.user_id
            """, [max_len]).df()
        con.unregister("_days")
        histories["history_hash"] = [_history_hash(ids) for ids in histories["history_item_ids"]]
        histories["day"] = pd.to_datetime(histories["day"]).dt.date
        warehouse.replace_partitions("user_histories", histories, days, con, run_id)
    return histories


def _history_hash(item_ids) -> str:
    return hashlib.sha256("\x1f".join(map(str, item_ids)).encode()).hexdigest()[:16]


def history_day_stats(histories: pd.DataFrame, days: Sequence[date]) -> pd.DataFrame:
    stats = histories.groupby("day").agg(
        users=("user_id", "size"), cold_start_users=("n_positives", lambda s: int((s == 0).sum())),
        median_positives=("n_positives", "median"))
    stats = stats.reindex(sorted(set(days)))
    stats[["users", "cold_start_users"]] = stats[["users", "cold_start_users"]].fillna(0).astype(int)
    return stats


def nonempty_event_days(warehouse: Warehouse) -> set[date]:
    """Days whose events partition holds rows."""
    if not warehouse.path.exists():
        return set()
    frame = warehouse.query("SELECT day FROM partitions WHERE table_name = 'events' AND n_rows > 0")
    return set(pd.to_datetime(frame["day"]).dt.date)
