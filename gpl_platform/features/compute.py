"""Feature computation from the DuckDB warehouse, with point-in-time semantics.

The row of entity ``e`` for feature day ``D`` uses only events with ``day < D`` (UTC) and carries
``event_timestamp = D 00:00 UTC``. Every function takes a list of feature days and computes them all
in one query (a range run costs one scan, not one per day). Only ``events``, ``users``, ``items``
and ``item_embeddings`` are read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import pandas as pd

from gpl_platform.data.warehouse import table_exists
from gpl_platform.features.schema import (
    EMBEDDING_DIM,
    FLOAT,
    LONG_TAIL_HEAD_SHARE,
    SMOOTHING_STRENGTH,
    STATIC_TIMESTAMP,
    TIMESTAMP_FIELD,
    WINDOW_DAYS,
    FeatureSpec,
    spec_from_columns,
)

log = logging.getLogger(__name__)


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _days_frame(days: Sequence[date]) -> pd.DataFrame:
    return pd.DataFrame({"fday": pd.to_datetime(pd.Series(sorted(set(days)), dtype="object"))})


def _columns(con, table: str) -> dict[str, str]:
    return {r[0]: str(r[1]) for r in con.execute(f'DESCRIBE "{table}"').fetchall()}


def spec_from_warehouse(con) -> FeatureSpec:
    """The feature spec of the ingested source: attribute columns of ``users`` and ``items``.

    Also checks that ``item_embeddings`` (when present) has the contract's embedding size."""
    for table in ("users", "items"):
        if not table_exists(con, table):
            raise RuntimeError(f"warehouse has no `{table}` table: materialize item_catalog/users first")
    if table_exists(con, "item_embeddings"):
        vtype = _columns(con, "item_embeddings").get("vector", "")
        if "[" in vtype and int(vtype.rsplit("[", 1)[1].rstrip("]")) != EMBEDDING_DIM:
            raise ValueError(
                f"item_embeddings are {vtype.rsplit('[', 1)[1].rstrip(']')}-d vectors; the feature "
                f"contract (gpl_platform/features/schema.py EMBEDDING_DIM) has {EMBEDDING_DIM}-d "
                "embeddings: another size is another feature-service version"
            )
    return spec_from_columns(_columns(con, "users"), _columns(con, "items"))


# ---- activity snapshots ---------------------------------------------------------------------
_USER_SQL = f"""
WITH target AS (SELECT CAST(fday AS DATE) AS fday FROM _fdays),
daily AS (
    SELECT user_id, day, count(DISTINCT request_id) AS req,
           count(*) FILTER (WHERE exposed) AS exp,
           coalesce(sum(clicked) FILTER (WHERE exposed), 0) AS clk
    FROM events WHERE day < (SELECT max(fday) FROM target) GROUP BY user_id, day),
totals AS (
    SELECT t.fday, coalesce(sum(d.exp), 0) AS exp, coalesce(sum(d.clk), 0) AS clk
    FROM target t LEFT JOIN daily d ON d.day < t.fday GROUP BY t.fday),
agg AS (
    SELECT u.user_id, t.fday,
           coalesce(sum(d.req), 0) AS req, coalesce(sum(d.exp), 0) AS exp, coalesce(sum(d.clk), 0) AS clk,
           coalesce(sum(d.exp) FILTER (WHERE d.day >= t.fday - {WINDOW_DAYS}), 0) AS exp7,
           coalesce(sum(d.clk) FILTER (WHERE d.day >= t.fday - {WINDOW_DAYS}), 0) AS clk7,
           count(d.day) AS active_days, max(d.day) AS last_day
    FROM (SELECT DISTINCT user_id FROM users) u CROSS JOIN target t
    LEFT JOIN daily d ON d.user_id = u.user_id AND d.day < t.fday
    GROUP BY u.user_id, t.fday)
SELECT a.user_id, a.fday AS day,
       CAST(a.req AS BIGINT) AS user_requests, CAST(a.exp AS BIGINT) AS user_exposures,
       CAST(a.clk AS BIGINT) AS user_clicks,
       CAST(CASE WHEN a.exp > 0 THEN a.clk / a.exp ELSE 0 END AS DOUBLE) AS user_click_rate,
       CAST((a.clk + {SMOOTHING_STRENGTH} * CASE WHEN g.exp > 0 THEN g.clk / g.exp ELSE 0 END)
            / (a.exp + {SMOOTHING_STRENGTH}) AS DOUBLE) AS user_click_rate_smoothed,
       CAST(a.exp7 AS BIGINT) AS user_exposures_7d, CAST(a.clk7 AS BIGINT) AS user_clicks_7d,
       CAST(a.active_days AS BIGINT) AS user_active_days,
       CAST(coalesce(date_diff('day', a.last_day, a.fday), -1) AS BIGINT) AS user_days_since_last_request
FROM agg a JOIN totals g USING (fday)
ORDER BY day, user_id
"""

_ITEM_SQL = f"""
WITH target AS (SELECT CAST(fday AS DATE) AS fday FROM _fdays),
daily AS (
    SELECT item_id, day, count(*) AS cand, count(*) FILTER (WHERE exposed) AS exp,
           coalesce(sum(clicked) FILTER (WHERE exposed), 0) AS clk
    FROM events WHERE day < (SELECT max(fday) FROM target) GROUP BY item_id, day),
totals AS (
    SELECT t.fday, coalesce(sum(d.exp), 0) AS exp, coalesce(sum(d.clk), 0) AS clk
    FROM target t LEFT JOIN daily d ON d.day < t.fday GROUP BY t.fday),
agg AS (
    SELECT i.item_id, t.fday,
           coalesce(sum(d.cand), 0) AS cand, coalesce(sum(d.exp), 0) AS exp, coalesce(sum(d.clk), 0) AS clk,
           coalesce(sum(d.exp) FILTER (WHERE d.day >= t.fday - {WINDOW_DAYS}), 0) AS exp7,
           coalesce(sum(d.clk) FILTER (WHERE d.day >= t.fday - {WINDOW_DAYS}), 0) AS clk7
    FROM (SELECT DISTINCT item_id FROM items) i CROSS JOIN target t
    LEFT JOIN daily d ON d.item_id = i.item_id AND d.day < t.fday
    GROUP BY i.item_id, t.fday),
ranked AS (
    SELECT *,
           percent_rank() OVER (PARTITION BY fday ORDER BY exp) AS prank,
           coalesce(sum(exp) OVER (PARTITION BY fday ORDER BY exp DESC, item_id
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS exp_before,
           sum(exp) OVER (PARTITION BY fday) AS exp_total
    FROM agg)
SELECT r.item_id, r.fday AS day,
       CAST(r.cand AS BIGINT) AS item_candidates, CAST(r.exp AS BIGINT) AS item_exposures,
       CAST(r.clk AS BIGINT) AS item_clicks,
       CAST(CASE WHEN r.exp > 0 THEN r.clk / r.exp ELSE 0 END AS DOUBLE) AS item_ctr,
       CAST((r.clk + {SMOOTHING_STRENGTH} * CASE WHEN g.exp > 0 THEN g.clk / g.exp ELSE 0 END)
            / (r.exp + {SMOOTHING_STRENGTH}) AS DOUBLE) AS item_ctr_smoothed,
       CAST(r.exp7 AS BIGINT) AS item_exposures_7d, CAST(r.clk7 AS BIGINT) AS item_clicks_7d,
       CAST(CASE WHEN r.exp_total = 0 THEN 0 ELSE least(9, floor(10 * r.prank)) END AS BIGINT)
           AS item_popularity_bucket,
       CAST(CASE WHEN r.exp > 0 AND r.exp_before < {LONG_TAIL_HEAD_SHARE} * r.exp_total THEN 0 ELSE 1 END AS BIGINT)
           AS item_long_tail
FROM ranked r JOIN totals g USING (fday)
ORDER BY day, item_id
"""


def _with_timestamp(frame: pd.DataFrame) -> pd.DataFrame:
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    frame[TIMESTAMP_FIELD] = pd.to_datetime(frame["day"]).dt.tz_localize("UTC").astype("datetime64[us, UTC]")
    return frame


def _run_days(con, sql: str, days: Sequence[date]) -> pd.DataFrame:
    con.register("_fdays", _days_frame(days))
    try:
        return _with_timestamp(con.execute(sql).df())
    finally:
        con.unregister("_fdays")


def compute_user_activity(con, days: Sequence[date]) -> pd.DataFrame:
    """One row per (catalog user, feature day): ``user_id, day, event_timestamp`` and the user_activity features."""
    return _run_days(con, _USER_SQL, days)


def user_activity_chunks(con, days: Sequence[date], rows: int) -> Iterator[pd.DataFrame]:
    """:func:`compute_user_activity` streamed from DuckDB ``rows`` users at a time (same rows, same order)."""
    con.register("_fdays", _days_frame(days))
    try:
        for batch in con.sql(_USER_SQL).to_arrow_reader(rows):
            yield _with_timestamp(batch.to_pandas())
    finally:
        con.unregister("_fdays")


def compute_item_activity(con, days: Sequence[date]) -> pd.DataFrame:
    """One row per (catalog item, feature day): ``item_id, day, event_timestamp`` and the item_activity features."""
    return _run_days(con, _ITEM_SQL, days)


# ---- embeddings -----------------------------------------------------------------------------
def load_content_vectors(con, dim: int = EMBEDDING_DIM) -> dict[str, np.ndarray]:
    """``{item_id: float32 vector}`` from ``item_embeddings`` (empty if the table is absent).

    When several encoders are present, the most common ``encoder_id`` wins.
    """
    if not table_exists(con, "item_embeddings"):
        return {}
    from gpl_platform.pseudo_labels.encoder import load_item_embeddings

    rows = con.execute(
        "SELECT encoder_id, count(*) AS n FROM item_embeddings GROUP BY 1 ORDER BY n DESC, 1 LIMIT 1"
    ).fetchall()
    if not rows:
        return {}
    row = rows[0]
    ids, vecs = load_item_embeddings(con, row[0])
    if len(ids) and vecs.shape[1] != dim:
        raise ValueError(f"item_embeddings has dimension {vecs.shape[1]}, the feature spec says {dim}")
    return {str(i): v for i, v in zip(ids, vecs)}


def compute_user_history(
    con, days: Sequence[date], max_len: int, vectors: dict[str, np.ndarray], dim: int = EMBEDDING_DIM
) -> pd.DataFrame:
    """Sparse rows: for feature day D, the users who clicked on D-1 (their history changed), with the
    L2-normalized mean content embedding of their ``max_len`` most recent clicks before D.

    Users absent on D keep their latest earlier row (the view has no TTL), which is still their
    history at D. Columns: ``user_id, day, event_timestamp, user_history_emb, user_history_emb_n``.
    """
    return pd.concat(user_history_chunks(con, days, max_len, vectors, dim, rows=100_000), ignore_index=True)


def user_history_chunks(
    con, days: Sequence[date], max_len: int, vectors: dict[str, np.ndarray], dim: int, rows: int
) -> Iterator[pd.DataFrame]:
    """:func:`compute_user_history` streamed ``rows`` users at a time: DuckDB lists each user's recent clicks
    (ordered by day and user), and each chunk of users gets its mean vectors."""
    con.register("_fdays", _days_frame(days))
    try:
        reader = con.sql(f"""
            WITH target AS (SELECT CAST(fday AS DATE) AS fday FROM _fdays),
            changed AS (
                SELECT DISTINCT t.fday, e.user_id FROM target t
                JOIN events e ON e.day = t.fday - 1 AND e.exposed AND e.clicked = 1),
            ranked AS (
                SELECT c.fday, c.user_id, e.item_id,
                       row_number() OVER (PARTITION BY c.fday, c.user_id
                                          ORDER BY e.event_time DESC, e.item_id) AS rn
                FROM changed c JOIN events e
                  ON e.user_id = c.user_id AND e.day < c.fday AND e.exposed AND e.clicked = 1)
            SELECT fday AS day, user_id, list(item_id ORDER BY rn) AS item_ids FROM ranked
            WHERE rn <= {int(max_len)} GROUP BY fday, user_id ORDER BY day, user_id""").to_arrow_reader(rows)
        empty = True
        for batch in reader:
            empty = False
            yield _history_vectors(batch.to_pandas(), vectors, dim)
        if empty:
            yield _history_vectors(pd.DataFrame({"day": [], "user_id": [], "item_ids": []}), vectors, dim)
    finally:
        con.unregister("_fdays")


def _history_vectors(clicks: pd.DataFrame, vectors: dict[str, np.ndarray], dim: int) -> pd.DataFrame:
    """Per (day, user) row of ``item_ids``: the L2-normalized mean of the items' vectors (zeros without one)."""
    rows = []
    for day, user_id, item_ids in zip(clicks["day"], clicks["user_id"], clicks["item_ids"]):
        found = [vectors[i] for i in item_ids if i in vectors]
        if found:
            mean = np.mean(np.stack(found), axis=0, dtype=np.float64)
            norm = float(np.linalg.norm(mean))
            vec = (mean / norm if norm > 0 else mean).astype(np.float32)
        else:
            vec = np.zeros(dim, dtype=np.float32)
        rows.append((user_id, day, vec, len(found)))
    frame = pd.DataFrame(rows, columns=["user_id", "day", "user_history_emb", "user_history_emb_n"])
    frame["user_history_emb_n"] = frame["user_history_emb_n"].astype("int64")
    return _with_timestamp(frame)


# ---- static profiles ------------------------------------------------------------------------
def _attributes(frame: pd.DataFrame, mapping: dict[str, tuple[str, str]]) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for name, (column, dtype) in mapping.items():
        col = frame[column]
        if dtype == FLOAT:
            out[name] = pd.to_numeric(col, errors="coerce").astype("float64")
        else:
            out[name] = col.astype("string").astype(object).where(col.notna(), None)
    return out


def _static_ts(n: int) -> pd.Series:
    return pd.Series(pd.Timestamp(STATIC_TIMESTAMP), index=range(n)).astype("datetime64[us, UTC]")


def compute_user_profile(con, spec: FeatureSpec) -> pd.DataFrame:
    """One row per catalog user: ``user_known`` = 1 and the attribute columns."""
    users = con.execute("SELECT * FROM users ORDER BY user_id").df()
    out = pd.DataFrame({"user_id": users["user_id"].astype(str), "user_known": np.ones(len(users), dtype="int64")})
    out = pd.concat([out, _attributes(users, spec.user_attributes)], axis=1)
    out[TIMESTAMP_FIELD] = _static_ts(len(out)).to_numpy()
    return out


def compute_item_profile(con, spec: FeatureSpec, vectors: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per catalog item: ``item_known`` = 1, the content embedding (zeros and
    ``item_has_content_emb`` = 0 when missing) and the attribute columns."""
    items = con.execute("SELECT * FROM items ORDER BY item_id").df()
    zeros = np.zeros(spec.embedding_dim, dtype=np.float32)
    ids = items["item_id"].astype(str)
    out = pd.DataFrame(
        {
            "item_id": ids,
            "item_known": np.ones(len(items), dtype="int64"),
            "item_content_emb": [vectors.get(i, zeros) for i in ids],
            "item_has_content_emb": np.array([int(i in vectors) for i in ids], dtype="int64"),
        }
    )
    out = pd.concat([out, _attributes(items, spec.item_attributes)], axis=1)
    out[TIMESTAMP_FIELD] = _static_ts(len(out)).to_numpy()
    return out


def previous_days(days: Sequence[date], first_day: date) -> set[date]:
    """Event days a feature computation for ``days`` reads: every day in [first_day, max(days))."""
    last = max(days)
    return {first_day + timedelta(n) for n in range((last - first_day).days)}
