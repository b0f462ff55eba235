"""The engine interface and the in-process engine."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from gpl_platform.config import StreamingConfig
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
        item is requested; write it with :func:`gpl_platform.data.batches.insert_batch`)."""

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
