"""Ingestion into the warehouse: catalog, users, per-day events, per-day user histories."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta

import pandas as pd

from gpl_platform.data.batches import BATCH_OUTPUT, insert_batch
from gpl_platform.data.contract import EVENT_REQUIRED, ContractError, Dataset
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.policies import POLICY_COLUMN
from gpl_platform.data.warehouse import Warehouse

log = logging.getLogger(__name__)


def ingest_catalog(
    warehouse: Warehouse, dataset: Dataset, signature: dict, delivered_item_ids: Iterable[str] = ()
) -> dict:
    """Replace the `items` and `users` tables with the dataset's (one transaction). A catalog that lacks an
    item the warehouse's events or ``delivered_item_ids`` (events delivered, not yet ingested) name is refused
    before anything is written: it would leave events whose item is gone."""
    with warehouse.transaction() as con:
        warehouse.claim_source(signature, con)
        _refuse_orphaned_events(con, dataset.items["item_id"], delivered_item_ids)
        n_items = warehouse.replace_table("items", dataset.items, con)
        n_users = warehouse.replace_table("users", dataset.users, con)
    text_len = dataset.items["text"].str.len()
    return {
        "n_items": n_items,
        "n_users": n_users,
        "text_chars_median": float(text_len.median()),
        "item_columns": list(dataset.items.columns),
        "user_columns": list(dataset.users.columns),
    }


def _refuse_orphaned_events(con, catalog_ids: pd.Series, delivered_item_ids: Iterable[str]) -> None:
    catalog = pd.DataFrame({"item_id": catalog_ids.astype(str).unique()})
    con.register("_catalog_ids", catalog)
    try:
        ingested = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT item_id FROM events WHERE item_id NOT IN (SELECT item_id FROM _catalog_ids) "
                "ORDER BY item_id"
            ).fetchall()
        ]
    finally:
        con.unregister("_catalog_ids")
    delivered = sorted(set(delivered_item_ids) - set(catalog["item_id"]))
    for missing, where in ((ingested, "ingested events"), (delivered, "delivered events")):
        if missing:
            raise ContractError(
                "items",
                "item_id",
                len(missing),
                f"named by {where} are missing from the new catalog: the catalog is not replaced "
                "(keep retired items in it)",
                missing[:3],
            )


# the order of the warehouse's events table (ingestion inserts by position)
EVENT_COLUMNS = ["day", *EVENT_REQUIRED, "propensity", POLICY_COLUMN]
ORACLE_COLUMNS = ["day", "request_id", "item_id", "oracle_label", "oracle_probability"]  # `oracle_labels`' order


def ingest_event_days(
    warehouse: Warehouse, dataset: Dataset, days: Sequence[date], signature: dict, run_id: str | None = None
) -> pd.DataFrame:
    """Replace the events (and, apart, the oracle labels) of ``days``; returns per-day statistics
    (:func:`event_day_stats`)."""
    days = sorted(set(days))
    selected = dataset.events[dataset.events["day"].isin(days)]
    with warehouse.transaction() as con:
        warehouse.claim_source(signature, con)
        warehouse.replace_partitions("events", selected[EVENT_COLUMNS], days, con, run_id)
        warehouse.replace_partitions("oracle_labels", selected[ORACLE_COLUMNS], days, con, run_id)
        return event_day_stats(con, days)


def ingest_event_day_chunks(
    warehouse: Warehouse, day: date, chunks: Iterable[pd.DataFrame], signature: dict, run_id: str | None = None
) -> pd.DataFrame:
    """Replace the events (and, apart, the oracle labels) of ``day`` with ``chunks``, validated events of that
    day (``Dataset.events`` columns), one chunk in memory at a time, all in one transaction: a chunk that fails
    validation leaves the day's previous rows. Returns the day's statistics (:func:`event_day_stats`)."""
    with warehouse.transaction() as con:
        warehouse.claim_source(signature, con)
        for table in ("events", "oracle_labels"):
            warehouse.clear_partitions(table, [day], con)
        for chunk in chunks:
            other = set(chunk["day"]) - {day}
            if other:
                raise ValueError(f"events of {sorted(other)[:3]} in the chunks of {day}")
            # inserted through a relation: a registered frame would stay alive until the commit
            relation = con.from_df(chunk)
            insert_batch(relation, f"INSERT INTO events SELECT {', '.join(EVENT_COLUMNS)} FROM {BATCH_OUTPUT}")
            insert_batch(relation, f"INSERT INTO oracle_labels SELECT {', '.join(ORACLE_COLUMNS)} FROM {BATCH_OUTPUT}")
        for table in ("events", "oracle_labels"):
            warehouse.record_partitions(table, [day], con, run_id)
        return event_day_stats(con, [day])


def ingest_delivered_days(
    warehouse: Warehouse,
    read_days: Callable[[], Iterable[tuple[date, Iterable[pd.DataFrame]]]],
    signature: dict,
    run_id: str | None = None,
) -> pd.DataFrame:
    """Replace several delivered days: ``read_days()`` gives each day with its validated chunks
    (:func:`~gpl_platform.data.sources.delivered_day_events`). Every day is read and validated first, nothing
    kept, so a day the contract refuses refuses the whole range before anything is written; then each day is
    replaced in its own transaction (:func:`ingest_event_day_chunks`). Two reads instead of one transaction
    over the range: the memory stays a chunk's (one transaction's grows with the range: 1.14 GB peak against
    0.59 GB a day at a time, at 7.5M events). Returns the days' statistics."""
    for _day, chunks in read_days():
        for _chunk in chunks:  # reading a chunk validates it
            pass
    parts = [ingest_event_day_chunks(warehouse, d, chunks, signature, run_id) for d, chunks in read_days()]
    return pd.concat(parts) if parts else pd.DataFrame(columns=["events", "requests"], dtype=int)


def event_day_stats(con, days: Sequence[date]) -> pd.DataFrame:
    """Rows, requests, users, exposure and positive rates of the warehouse's events per day of ``days``, and the
    oracle's positive rate among unexposed rows (zero rows for empty days), computed in DuckDB."""
    days = sorted(set(days))
    stats = con.execute(
        """
        SELECT e.day, count(*) AS events, count(DISTINCT e.request_id) AS requests,
               count(DISTINCT e.user_id) AS users, avg(e.exposed::DOUBLE) AS exposure_rate,
               avg(e.clicked::DOUBLE) AS ctr_exposed,
               avg(o.oracle_label::DOUBLE) FILTER (WHERE NOT e.exposed) AS oracle_positive_rate_unexposed
        FROM events e LEFT JOIN oracle_labels o
          ON o.day = e.day AND o.request_id = e.request_id AND o.item_id = e.item_id
        WHERE e.day IN (SELECT unnest(?::DATE[])) GROUP BY e.day
        """,
        [days],
    ).df()
    stats["day"] = pd.to_datetime(stats["day"]).dt.date
    stats = stats.set_index("day").reindex(days)
    stats[["events", "requests", "users"]] = stats[["events", "requests", "users"]].fillna(0).astype(int)
    stats.index.name = "day"
    return stats


def build_user_histories(
    warehouse: Warehouse, days: Sequence[date], first_day: date, max_len: int, run_id: str | None = None
) -> pd.DataFrame:
    """Per day D, for each user with a request on D: their clicked items strictly before D (UTC), most
    recent first, at most ``max_len``, and a hash of that list (the anchor cache's key). Needs the events of
    every day in [first_day, D). One INSERT ... SELECT inside DuckDB (under its memory cap, spilling beyond):
    no history enters Python, so a range of a large traffic's histories costs DuckDB's cap, not its size.
    Returns per-day statistics (:data:`HISTORY_STATS` columns, one row per day of ``days``)."""
    days = sorted(set(days))
    written = warehouse.written_days("events")
    needed = {first_day + timedelta(n) for n in range((max(days) - first_day).days + 1)}
    missing = sorted(needed - written)
    if missing:
        raise MissingUpstreamDays(
            f"user histories for {days[0]}..{days[-1]} need the events of every earlier day, but "
            f"{len(missing)} day(s) are not ingested (first: {missing[0]}, last: {missing[-1]}). "
            "Materialize candidate_events for those partitions first."
        )
    with warehouse.transaction() as con:
        warehouse.clear_partitions("user_histories", days, con)
        con.execute(
            """
            INSERT INTO user_histories
            WITH req AS (
                SELECT DISTINCT e.day, e.user_id FROM events e WHERE e.day IN (SELECT unnest(?::DATE[]))
            ), latest AS (  -- a re-clicked item counts once, at its latest click before D
                SELECT r.day, r.user_id, e.item_id, max(e.event_time) AS event_time
                FROM req r JOIN events e ON e.user_id = r.user_id AND e.exposed AND e.clicked = 1 AND e.day < r.day
                GROUP BY r.day, r.user_id, e.item_id
            ), per_day AS (
                SELECT *, row_number() OVER (PARTITION BY day, user_id ORDER BY event_time DESC, item_id) AS rn
                FROM latest
            ), histories AS (
                SELECT r.day, r.user_id,
                       coalesce(list(h.item_id ORDER BY h.rn) FILTER (WHERE h.rn <= ?), []::VARCHAR[])
                           AS history_item_ids,
                       count(h.item_id)::INTEGER AS n_positives,
                       max(h.event_time) AS last_positive_time
                FROM req r LEFT JOIN per_day h ON h.day = r.day AND h.user_id = r.user_id
                GROUP BY r.day, r.user_id
            )
            -- the anchor cache's key: the first 16 hex digits of sha256 of the ids joined by chr(31)
            SELECT day, user_id, history_item_ids, n_positives, last_positive_time,
                   substr(sha256(array_to_string(history_item_ids, chr(31))), 1, 16) AS history_hash
            FROM histories ORDER BY day, user_id
            """,
            [days, max_len],
        )
        warehouse.record_partitions("user_histories", days, con, run_id)
        stats = con.execute(
            """
            SELECT day, count(*) AS users, count(*) FILTER (WHERE n_positives = 0) AS cold_start_users,
                   median(n_positives) AS median_positives, median(least(n_positives, ?)) AS median_history_len
            FROM user_histories WHERE day IN (SELECT unnest(?::DATE[])) GROUP BY day
            """,
            [max_len, days],
        ).df()
    stats["day"] = pd.to_datetime(stats["day"]).dt.date
    stats = stats.set_index("day").reindex(days)
    stats[["users", "cold_start_users"]] = stats[["users", "cold_start_users"]].fillna(0).astype(int)
    stats.index.name = "day"
    return stats


def nonempty_event_days(warehouse: Warehouse) -> set[date]:
    """Days whose events partition holds rows."""
    if not warehouse.path.exists():
        return set()
    frame = warehouse.query("SELECT day FROM partitions WHERE table_name = 'events' AND n_rows > 0")
    return set(pd.to_datetime(frame["day"]).dt.date)
