"""The embedded DuckDB warehouse: schema, atomic partition replacement, lock handling.

Every write is one DuckDB transaction (delete the partition's rows, insert the new ones, record
the partition), so a failed or killed run leaves the previous good state and a re-run replaces
rather than duplicates. DuckDB lets one process hold a file for writing; another process's lock
makes us wait up to ``lock_timeout_s`` and then fail with a message that says so.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from gpl_platform.data.sql import quote_identifier, quote_literal

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    day DATE NOT NULL, request_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL,
    event_time TIMESTAMPTZ NOT NULL, exposed BOOLEAN NOT NULL, clicked TINYINT, propensity DOUBLE,
    logging_policy VARCHAR
);
-- warehouses written before logging propensities and policies existed (a null policy is production's)
ALTER TABLE events ADD COLUMN IF NOT EXISTS propensity DOUBLE;
ALTER TABLE events ADD COLUMN IF NOT EXISTS logging_policy VARCHAR;
-- Kept apart from `events` so nothing that builds training data can read it by accident:
-- only evaluation code joins it back (tests/test_oracle_isolation.py enforces this).
CREATE TABLE IF NOT EXISTS oracle_labels (
    day DATE NOT NULL, request_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, oracle_label TINYINT,
    oracle_probability DOUBLE
);
-- the true click probability the oracle label was drawn from (a simulator's; null elsewhere and in older warehouses)
ALTER TABLE oracle_labels ADD COLUMN IF NOT EXISTS oracle_probability DOUBLE;
CREATE TABLE IF NOT EXISTS user_histories (
    day DATE NOT NULL, user_id VARCHAR NOT NULL, history_item_ids VARCHAR[] NOT NULL,
    n_positives INTEGER NOT NULL, last_positive_time TIMESTAMPTZ, history_hash VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS partitions (
    table_name VARCHAR NOT NULL, day DATE NOT NULL, n_rows BIGINT NOT NULL,
    written_at TIMESTAMPTZ NOT NULL, run_id VARCHAR, PRIMARY KEY (table_name, day)
);
CREATE TABLE IF NOT EXISTS warehouse_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
-- GPL stages (gpl_platform/pseudo_labels/pipeline.py), one partition per UTC day.
CREATE TABLE IF NOT EXISTS user_anchors (
    day DATE NOT NULL, user_id VARCHAR NOT NULL, anchor_id VARCHAR NOT NULL, anchor_rank INTEGER NOT NULL,
    anchor_text VARCHAR NOT NULL, logprob DOUBLE, gen_prob DOUBLE, is_fallback BOOLEAN, fallback_reason VARCHAR,
    backend VARCHAR, model_id VARCHAR, prompt_version VARCHAR, cache_key VARCHAR, anchor_signature VARCHAR
);
CREATE TABLE IF NOT EXISTS anchor_embeddings (
    day DATE NOT NULL, anchor_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, encoder_id VARCHAR NOT NULL,
    vector FLOAT[] NOT NULL
);
CREATE TABLE IF NOT EXISTS candidate_similarities (
    day DATE NOT NULL, request_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL,
    exposed BOOLEAN NOT NULL, similarity_max FLOAT, similarity_mean FLOAT, anchor_id VARCHAR,
    encoder_id VARCHAR, anchor_signature VARCHAR
);
CREATE TABLE IF NOT EXISTS calibrations (
    fit_key VARCHAR PRIMARY KEY, version VARCHAR NOT NULL, method VARCHAR NOT NULL, pooling VARCHAR NOT NULL,
    refit_day DATE NOT NULL,
    train_start DATE NOT NULL, train_end DATE NOT NULL, n_train BIGINT NOT NULL, positive_rate DOUBLE,
    artifact_path VARCHAR NOT NULL, calibration_json VARCHAR NOT NULL, fitted_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS pseudo_labels (
    day DATE NOT NULL, request_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL,
    event_time TIMESTAMPTZ NOT NULL, similarity_max FLOAT NOT NULL, similarity_mean FLOAT NOT NULL,
    anchor_id VARCHAR NOT NULL, pseudo_label DOUBLE NOT NULL, pseudo_label_mean_pool DOUBLE NOT NULL,
    confidence DOUBLE NOT NULL, c_coherence DOUBLE NOT NULL, c_history DOUBLE NOT NULL,
    c_generation DOUBLE NOT NULL, anchor_is_fallback BOOLEAN NOT NULL, llm_version VARCHAR NOT NULL,
    prompt_version VARCHAR NOT NULL, encoder_version VARCHAR NOT NULL, calibration_version VARCHAR NOT NULL,
    calibration_version_mean_pool VARCHAR NOT NULL
);
"""

_LOCK_PATTERNS = re.compile(
    r"could not set lock|conflicting lock|lock on file|resource temporarily unavailable", re.IGNORECASE
)


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether ``name`` is a table of the connection's database."""
    # fetchall, not fetchone: DuckDB 2 keeps a half-read result open and refuses the connection's next call.
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0])


def _days_frame(days: Sequence[date]) -> pd.DataFrame:
    return pd.DataFrame({"day": pd.to_datetime(pd.Series(sorted(set(days)), dtype="object"))})


class WarehouseLockedError(RuntimeError):
    """Another process holds the DuckDB file and did not let go within the timeout."""


@contextmanager
def atomic(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A transaction on an open connection (one whose temp tables the work needs): committed whole, or
    rolled back whole on any error."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


class WarehouseSourceMismatch(RuntimeError):
    """The warehouse already holds data of another source or protocol."""


class Warehouse:
    def __init__(self, path: Path | str, lock_timeout_s: float = 60.0, memory_limit: str | None = None):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        # DuckDB keeps the pages it read cached up to its limit (80% of RAM by default), so without a
        # cap every stage's memory grows with the tables it scans
        self.memory_limit = memory_limit

    @classmethod
    def for_settings(cls, settings) -> Warehouse:
        """The warehouse of ``settings``, with its lock timeout and DuckDB memory cap."""
        return cls(settings.warehouse, settings.warehouse_lock_timeout_s, settings.streaming.duckdb_memory_limit)

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    # ---- connections ---------------------------------------------------------------------
    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                con.execute("SET TimeZone = 'UTC'")
                if self.memory_limit:
                    con.execute(f"SET memory_limit = {quote_literal(self.memory_limit)}")
                return con
            except duckdb.IOException as exc:
                if not _LOCK_PATTERNS.search(str(exc)):
                    raise
                if time.monotonic() >= deadline:
                    raise WarehouseLockedError(
                        f"{self.path} is locked by another process and stayed locked for "
                        f"{self.lock_timeout_s:.0f}s (DuckDB allows one writer). Wait for the other run "
                        f"to finish, or raise GPL_WAREHOUSE_LOCK_TIMEOUT_S. DuckDB said: {exc}"
                    ) from exc
                log.info("warehouse %s is locked by another process; retrying in %.2fs", self.path, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise FileNotFoundError(
                f"{self.path}: the warehouse does not exist yet; materialize the ingestion assets first"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only)
        try:
            if not read_only:
                con.execute(SCHEMA)
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write transaction: committed whole, or rolled back whole on any error."""
        with self.connect() as con, atomic(con):
            yield con

    # ---- reads ---------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence | None = None) -> pd.DataFrame:
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def table_exists(self, name: str) -> bool:
        if not self.path.exists():
            return False
        with self.connect(read_only=True) as con:
            return table_exists(con, name)

    def written_days(self, table: str) -> set[date]:
        if not self.path.exists():
            return set()
        frame = self.query("SELECT day FROM partitions WHERE table_name = ?", [table])
        return set(pd.to_datetime(frame["day"]).dt.date)

    # ---- writes --------------------------------------------------------------------------
    def replace_table(self, name: str, frame: pd.DataFrame, con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Replace a whole (unpartitioned) table atomically."""
        if con is None:
            with self.transaction() as tx:
                return self.replace_table(name, frame, tx)
        con.register("_incoming", frame)
        try:
            con.execute(f"CREATE OR REPLACE TABLE {quote_identifier(name)} AS SELECT * FROM _incoming")
        finally:
            con.unregister("_incoming")
        return len(frame)

    def replace_partitions(
        self,
        table: str,
        frame: pd.DataFrame | pa.Table,
        days: Sequence[date],
        con: duckdb.DuckDBPyConnection,
        run_id: str | None = None,
    ) -> dict[date, int]:
        """Replace the rows of ``days`` in ``table`` with ``frame`` (whose `day` must lie in ``days``)
        and record every day, empty ones too, in ``partitions``. Call inside :meth:`transaction`.
        ``frame`` may be an Arrow table (vector columns go in without a Python-object detour)."""
        days = sorted(set(days))
        names = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
        if "day" not in names:
            raise ValueError(f"{table}: frame has no 'day' column")
        day_values = frame.column("day").to_pandas() if isinstance(frame, pa.Table) else frame["day"]
        row_days = pd.to_datetime(day_values).dt.date if len(day_values) else pd.Series([], dtype=object)
        frame_days = set(row_days)
        if not frame_days <= set(days):
            raise ValueError(
                f"{table}: rows for days {sorted(frame_days - set(days))[:3]} outside the partitions written"
            )
        columns = [r[0] for r in con.execute(f"DESCRIBE {quote_identifier(table)}").fetchall()]
        incoming = frame.select(columns) if isinstance(frame, pa.Table) else frame[columns]
        counts = row_days.value_counts().to_dict()
        con.register("_days", pd.DataFrame({"day": pd.to_datetime(pd.Series(days, dtype="object"))}))
        con.register("_incoming", incoming)
        try:
            con.execute(f"DELETE FROM {quote_identifier(table)} WHERE day IN (SELECT CAST(day AS DATE) FROM _days)")
            con.execute(f"INSERT INTO {quote_identifier(table)} SELECT * FROM _incoming")
            rows = pd.DataFrame(
                {
                    "table_name": table,
                    "day": pd.to_datetime(pd.Series(days, dtype="object")),
                    "n_rows": [int(counts.get(d, 0)) for d in days],
                    "run_id": run_id,
                }
            )
            con.register("_parts", rows)
            con.execute(
                "INSERT OR REPLACE INTO partitions SELECT table_name, CAST(day AS DATE), n_rows, now(), run_id "
                "FROM _parts"
            )
        finally:
            for view in ("_days", "_incoming", "_parts"):
                con.unregister(view)
        return {d: int(counts.get(d, 0)) for d in days}

    def clear_partitions(self, table: str, days: Sequence[date], con: duckdb.DuckDBPyConnection) -> None:
        """Delete the rows of ``days`` from ``table``: the first step of a streamed replacement (then insert the
        batches and :meth:`record_partitions`, all inside one :meth:`transaction`)."""
        con.register("_clear_days", _days_frame(days))
        try:
            con.execute(
                f"DELETE FROM {quote_identifier(table)} WHERE day IN (SELECT CAST(day AS DATE) FROM _clear_days)"
            )
        finally:
            con.unregister("_clear_days")

    def record_partitions(
        self, table: str, days: Sequence[date], con: duckdb.DuckDBPyConnection, run_id: str | None = None
    ) -> dict[date, int]:
        """Record every day of ``days`` (empty ones too) in ``partitions`` with its row count in ``table``."""
        days = sorted(set(days))
        con.register("_record_days", _days_frame(days))
        try:
            counts = dict(
                con.execute(
                    f"SELECT day, count(*) FROM {quote_identifier(table)} "
                    "WHERE day IN (SELECT CAST(day AS DATE) FROM _record_days) GROUP BY day"
                ).fetchall()
            )
            con.execute(
                "INSERT OR REPLACE INTO partitions SELECT ?, CAST(day AS DATE), coalesce(c.n, 0), now(), ? "
                "FROM _record_days LEFT JOIN (SELECT unnest(?::DATE[]) AS d, unnest(?::BIGINT[]) AS n) c "
                "ON c.d = CAST(day AS DATE)",
                [table, run_id, list(counts), list(counts.values())],
            )
        finally:
            con.unregister("_record_days")
        return {d: int(counts.get(d, 0)) for d in days}

    def import_caches(self, other: Path | str, tables: Sequence[str] = ("anchor_cache", "item_embeddings")) -> dict:
        """Copy work another warehouse already did and that does not depend on its events: cached
        anchors (keyed by history, model, prompt and parameters) and item vectors (keyed by text and
        encoder). Rows already here win. Returns the rows copied per table."""
        other = Path(other)
        if not other.exists() or other.resolve() == self.path.resolve():
            return {}
        copied = {}
        with self.connect() as con:
            con.execute(f"ATTACH {quote_literal(str(other))} AS _other (READ_ONLY)")
            try:
                con.execute("BEGIN TRANSACTION")
                for table in tables:
                    ddl = con.execute(
                        "SELECT sql FROM duckdb_tables() WHERE database_name = '_other' AND table_name = ?", [table]
                    ).fetchall()
                    if not ddl:
                        continue
                    here = con.execute(
                        "SELECT count(*) FROM duckdb_tables() WHERE database_name = "
                        "current_database() AND table_name = ?",
                        [table],
                    ).fetchall()[0][0]
                    if not here:  # the other's DDL, keys included, so that INSERT OR IGNORE can dedupe
                        con.execute(ddl[0][0])
                    before = con.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0]
                    con.execute(
                        f"INSERT OR IGNORE INTO {quote_identifier(table)} "
                        f"SELECT * FROM _other.{quote_identifier(table)}"
                    )
                    copied[table] = (
                        con.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0] - before
                    )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            finally:
                con.execute("DETACH _other")
        return copied

    # ---- source identity -----------------------------------------------------------------
    def claim_source(self, signature: dict, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse to mix data of different sources/protocols in one warehouse."""
        wanted = json.dumps(signature, sort_keys=True)
        row = con.execute("SELECT value FROM warehouse_meta WHERE key = 'source_signature'").fetchone()
        has_events = con.execute("SELECT count(*) FROM partitions").fetchone()[0] > 0
        if row and row[0] != wanted and has_events:
            raise WarehouseSourceMismatch(
                f"{self.path} holds data of another source or protocol:\n  stored: {row[0]}\n  wanted: {wanted}\n"
                "Use another data_dir (GPL_DATA_DIR) or remove the warehouse with `gpl reset`."
            )
        con.execute("INSERT OR REPLACE INTO warehouse_meta VALUES ('source_signature', ?)", [wanted])
