"""DuckDB cache of anchors: a user's anchors are generated once per (history, generator) and reused.

``cache_key = sha256(user_id, history item ids + texts, generator.cache_signature())``: a change
of history, model, prompt version or output-changing parameter gives a new key (a miss); the
same input hits and costs no generation. Functions take an open ``duckdb.DuckDBPyConnection``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence

import duckdb
import pandas as pd

from gpl_platform.pseudo_labels.anchors.base import ANCHOR_COLUMNS, AnchorGenerator, UserHistory, frame_from_rows

logger = logging.getLogger(__name__)

TABLE = "anchor_cache"

_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    cache_key VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL,
    anchor_rank INTEGER NOT NULL,
    anchor_text VARCHAR NOT NULL,
    logprob DOUBLE,
    gen_prob DOUBLE,
    is_fallback BOOLEAN,
    fallback_reason VARCHAR,
    backend VARCHAR,
    model_id VARCHAR,
    prompt_version VARCHAR,
    created_at TIMESTAMPTZ DEFAULT current_timestamp,
    PRIMARY KEY (cache_key, anchor_rank)
)
"""

CACHE_COLUMNS = [
    "cache_key",
    "user_id",
    "anchor_rank",
    "anchor_text",
    "logprob",
    "gen_prob",
    "is_fallback",
    "fallback_reason",
    "backend",
    "model_id",
    "prompt_version",
    "created_at",
]


def ensure_cache_table(con) -> None:
    con.execute(_DDL)


def cache_key(history: UserHistory, signature: str, k: int | None = None) -> str:
    """sha256 over the user, the history (ids and texts, in order) and the generator signature.

    ``k`` enters the key too when given: anchors made for k=3 are not a valid answer for k=5.
    """
    payload: dict[str, object] = {
        "user_id": str(history.user_id),
        "item_ids": [str(i) for i in history.item_ids],
        "item_texts": [str(t) for t in history.item_texts],
        "generator": signature,
    }
    if k is not None:
        payload["k"] = int(k)
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def lookup(con, keys: Sequence[str]) -> pd.DataFrame:
    """Cached rows for the given keys (any order)."""
    ensure_cache_table(con)
    if not keys:
        return pd.DataFrame(columns=CACHE_COLUMNS)
    keys_df = pd.DataFrame({"cache_key": list(dict.fromkeys(keys))})
    con.register("_anchor_keys", keys_df)
    try:
        return con.execute(
            f"SELECT c.* FROM {TABLE} c JOIN _anchor_keys k USING (cache_key) ORDER BY c.cache_key, c.anchor_rank"
        ).df()
    finally:
        con.unregister("_anchor_keys")


def insert(con, rows: pd.DataFrame, generator: AnchorGenerator) -> int:
    """Insert anchor rows (with a ``cache_key`` column) in one transaction; existing keys are replaced.

    Must be called outside an open transaction on ``con`` (DuckDB does not nest transactions).
    """
    ensure_cache_table(con)
    if rows.empty:
        return 0
    df = rows[["cache_key", *ANCHOR_COLUMNS]].copy()
    df["backend"] = generator.backend
    df["model_id"] = generator.model_id
    df["prompt_version"] = generator.prompt_version
    df["anchor_rank"] = df["anchor_rank"].astype("int32")
    con.register("_anchor_new", df)
    try:
        con.execute("BEGIN TRANSACTION")
    except duckdb.TransactionException as e:
        # DuckDB has no nested transactions, and the failed BEGIN aborts the caller's one
        raise RuntimeError("anchor cache insert must run outside an open transaction (it commits its own)") from e
    own_tx = True
    try:
        con.execute(f"DELETE FROM {TABLE} WHERE cache_key IN (SELECT DISTINCT cache_key FROM _anchor_new)")
        con.execute(
            f"""INSERT INTO {TABLE} (cache_key, user_id, anchor_rank, anchor_text, logprob, gen_prob,
                    is_fallback, fallback_reason, backend, model_id, prompt_version, created_at)
                SELECT cache_key, user_id, anchor_rank, anchor_text, logprob, gen_prob, is_fallback,
                       fallback_reason, backend, model_id, prompt_version, current_timestamp
                FROM _anchor_new"""
        )
        if own_tx:
            con.execute("COMMIT")
    except Exception:
        if own_tx:
            con.execute("ROLLBACK")
        raise
    finally:
        try:
            con.unregister("_anchor_new")
        except duckdb.Error:  # pragma: no cover - connection in an aborted state
            pass
    return len(df)


def generate_misses(
    con,
    generator: AnchorGenerator,
    histories: Sequence[UserHistory],
    keys: Sequence[str],
    k: int,
    progress: bool = True,
) -> tuple[pd.DataFrame, set[str], dict[str, int]]:
    """Generate and store the anchors of the histories whose ``keys`` the cache does not hold yet.

    Returns the generated rows (``cache_key`` plus :data:`ANCHOR_COLUMNS`), the keys that were hits,
    and stats: the generator's counters plus ``cache_hits`` / ``cache_misses`` (in histories).
    Duplicate histories are generated once."""
    ensure_cache_table(con)
    hit_keys = lookup_keys(con, keys)
    miss_idx: list[int] = []
    seen_miss: set[str] = set()
    for i, key in enumerate(keys):
        if key not in hit_keys and key not in seen_miss:
            seen_miss.add(key)
            miss_idx.append(i)

    stats: Counter = Counter()
    stats["cache_hits"] = sum(1 for key in keys if key in hit_keys)
    stats["cache_misses"] = len(keys) - stats["cache_hits"]
    new_rows = pd.DataFrame(columns=["cache_key", *ANCHOR_COLUMNS])
    if miss_idx:
        # user ids must be unique within one generate call (rows are matched back by user_id):
        # the r-th distinct history of a user goes into round r (normally a single round)
        rounds: list[list[int]] = []
        occurrence: Counter = Counter()
        for i in miss_idx:
            uid = str(histories[i].user_id)
            r = occurrence[uid]
            occurrence[uid] += 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        parts = []
        for rnd in rounds:
            res = generator.generate([histories[i] for i in rnd], k, progress=progress)
            stats.update(res.stats)
            key_of_user = {str(histories[i].user_id): keys[i] for i in rnd}
            part = res.anchors.copy()
            part.insert(0, "cache_key", part["user_id"].map(key_of_user))
            parts.append(part)
        new_rows = pd.concat(parts, ignore_index=True)
        insert(con, new_rows, generator)
    logger.debug(  # per call: the asset logs the totals as "anchor stats"
        "anchor cache: %d hits, %d misses (%d generated users) for %s",
        stats["cache_hits"],
        stats["cache_misses"],
        len(miss_idx),
        generator.backend,
    )
    return new_rows, hit_keys, {k_: int(v) for k_, v in stats.items()}


def lookup_keys(con, keys: Sequence[str], table: str = TABLE) -> set[str]:
    """Which of ``keys`` ``table`` (the cache, or any table with a ``cache_key`` column) holds."""
    if not keys:
        return set()
    query = f"SELECT DISTINCT cache_key FROM {table} WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))"
    return {row[0] for row in con.execute(query, [list(dict.fromkeys(keys))]).fetchall()}


def generate_with_cache(
    con,
    generator: AnchorGenerator,
    histories: Sequence[UserHistory],
    k: int,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Anchors for all users: cached ones are read, only misses are generated (and then stored).

    Returns the anchors frame (:data:`ANCHOR_COLUMNS` plus ``cache_key``, in input user order,
    then rank) and stats: the generator's counters for the misses plus ``cache_hits`` /
    ``cache_misses`` (in users). Duplicate histories in the input are generated once.
    """
    histories = list(histories)
    sig = generator.cache_signature()
    keys = [cache_key(h, sig, k) for h in histories]
    new_rows, hit_keys, stats = generate_misses(con, generator, histories, keys, k, progress)
    cached = lookup(con, sorted(hit_keys))

    frames = [f for f in (cached[["cache_key", *ANCHOR_COLUMNS]], new_rows) if not f.empty]
    all_rows = pd.concat(frames, ignore_index=True) if frames else new_rows
    by_key = {key: grp for key, grp in all_rows.groupby("cache_key", sort=False)}
    parts = []
    for h, key in zip(histories, keys):
        g = by_key[key].sort_values("anchor_rank").copy()
        g["user_id"] = str(h.user_id)
        parts.append(g)
    if parts:
        out = pd.concat(parts, ignore_index=True)
        framed = frame_from_rows(out[list(ANCHOR_COLUMNS)].to_dict("records"))
        framed.insert(0, "cache_key", out["cache_key"].to_numpy())
    else:
        framed = frame_from_rows([])
        framed.insert(0, "cache_key", pd.Series([], dtype=object))
    return framed, stats
