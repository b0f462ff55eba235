"""The engine interface, the in-process engine, and batch planning in DuckDB."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from gpl_platform.config import Settings, StreamingConfig
from gpl_platform.data.sql import quote_literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shared:
    """Something every call of a :meth:`Engine.map` needs and each worker builds once: ``build()`` runs
    on the worker (load a model, unpickle a generator) and its result is cached under ``key``."""

    key: tuple
    build: Callable[[], Any]


@dataclass(frozen=True)
class BatchJob:
    """``fn(inputs, context) -> pa.Table`` over batches. ``inputs(batch)`` maps each input name to a
    SQL query on the driver's DuckDB connection (the batch's rows, in a fixed order); engines call it
    once per batch, in batch order, right before they read those rows (so it may stage them then).
    ``fn`` and ``context`` must be picklable (a module-level function, plain data)."""

    name: str
    fn: Callable[[dict[str, pa.Table], Any], pa.Table]
    context: Any
    inputs: Callable[[int], dict[str, str]]


class Engine(ABC):
    """Runs batch jobs and maps. ``streaming`` holds the batch sizes both engines use, so that both cut
    the work the same way."""

    name: str = "abstract"
    workers: int = 1

    def __init__(self, streaming: StreamingConfig | None = None):
        self.streaming = streaming or StreamingConfig()

    def configure(self, con) -> None:
        """Bound DuckDB's own memory on the driver's connection while a stage streams."""
        con.execute(f"SET memory_limit = {quote_literal(self.streaming.duckdb_memory_limit)}")

    @abstractmethod
    def run(self, con, job: BatchJob, batches: Sequence[int]) -> Iterator[duckdb.DuckDBPyRelation]:
        """For each batch, in order: a relation on ``con`` over ``job.fn``'s output (valid until the next
        item is requested; write it with :func:`insert_batch`)."""

    @abstractmethod
    def map(self, fn: Callable[[Any, Any], Any], shared: Shared, payloads: Sequence[Any]) -> list:
        """``[fn(shared.build(), p) for p in payloads]``, the shared object built once per worker."""

    def describe(self) -> dict:
        return {"engine": self.name, "workers": self.workers, "batch_candidates": self.streaming.batch_candidates}

    def close(self) -> None:
        """Release workers (nothing to release in this process)."""


class LocalEngine(Engine):
    """Everything in this process, one batch after the other (numpy/BLAS use the machine's cores)."""

    name = "local"

    def __init__(self, streaming: StreamingConfig | None = None):
        super().__init__(streaming)
        self._shared: dict[tuple, Any] = {}

    def run(self, con, job: BatchJob, batches: Sequence[int]) -> Iterator[str]:
        for batch in batches:
            tables = {name: con.sql(sql).to_arrow_table() for name, sql in job.inputs(batch).items()}
            yield con.from_arrow(job.fn(tables, job.context))

    def map(self, fn, shared: Shared, payloads):
        if shared.key not in self._shared:
            self._shared = {shared.key: shared.build()}  # one model at a time: the previous one is released
        obj = self._shared[shared.key]
        return [fn(obj, p) for p in payloads]


BATCH_OUTPUT = "batch_output"


def insert_batch(relation: duckdb.DuckDBPyRelation, insert_sql: str) -> None:
    """Run ``insert_sql``, which reads the relation as ``batch_output``. The relation is not registered on
    the connection: inside a transaction DuckDB keeps every registered object alive until the commit,
    so registering each batch would hold the whole range's outputs in memory."""
    relation.query(BATCH_OUTPUT, insert_sql)


_ENGINES: dict[tuple, Engine] = {}


def make_engine(settings: Settings) -> Engine:
    """The engine the settings select, one per process and configuration (a Ray connection is reused)."""
    key = (
        settings.engine,
        settings.streaming.model_dump_json(),
        settings.ray.model_dump_json(),
        str(settings.data_dir),
    )
    if key not in _ENGINES:
        if settings.engine == "ray":
            from gpl_platform.engine.ray_engine import RayEngine

            staging = settings.ray.staging_dir or settings.data_dir / "staging"
            _ENGINES[key] = RayEngine(settings.ray.model_copy(update={"staging_dir": staging}), settings.streaming)
        else:
            _ENGINES[key] = LocalEngine(settings.streaming)
    return _ENGINES[key]


def close_engines() -> None:
    """Release what the engines of :func:`make_engine` hold (Ray actors keep their CPUs until then)."""
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


# ---- batch planning ----------------------------------------------------------------------------

PLAN_TABLE = "_gpl_plan"


def plan_user_batches(con, counts_sql: str, batch_rows: int, key: str = "user_id") -> int:
    """Cut the (day, ``key``, n) rows of ``counts_sql`` into batches of about ``batch_rows`` rows, in
    (day, ``key``) order, never splitting a (day, key) pair (a user's or a request's candidates of a day).
    Creates the temp table ``_gpl_plan`` (day, key, n, user_code, batch): ``user_code`` numbers the pairs
    0..U-1 in that order (the integer key every batch input joins on). Returns the number of batches."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {PLAN_TABLE} AS
        SELECT day, {key}, n, (row_number() OVER w - 1)::BIGINT AS user_code,
               ((sum(n) OVER w - n) // {int(batch_rows)})::BIGINT AS batch
        FROM ({counts_sql}) WINDOW w AS (ORDER BY day, {key} ROWS UNBOUNDED PRECEDING)""")
    # batch numbers are increasing but may skip values (one user larger than a batch): renumber densely
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {PLAN_TABLE} AS
        SELECT day, {key}, n, user_code, (dense_rank() OVER (ORDER BY batch) - 1)::BIGINT AS batch
        FROM {PLAN_TABLE}""")
    return int(con.execute(f"SELECT coalesce(max(batch) + 1, 0) FROM {PLAN_TABLE}").fetchall()[0][0])
