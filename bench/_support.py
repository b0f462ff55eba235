"""What the benchmarks and the tests both build on: a complete small feature store from a settings value,
deterministic random item vectors, and servers in subprocesses on a free local port. The benchmarks import
it as ``_support`` (bench/ on their path, like ``_timing``), the tests as ``bench._support`` (through
tests/helpers.py and tests/processes.py); nothing here imports the tests.

``build_feature_world(settings)`` ingests the source into the warehouse, fills ``item_embeddings``
with deterministic random unit vectors (no model load) unless the table is already there,
writes the feature files, applies the Feast repository and materializes the online store.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Sequence

import numpy as np

from gpl_platform.config import Settings
from gpl_platform.features.schema import EMBEDDING_DIM


class RandomEncoder:
    """Deterministic pseudo-embeddings: a unit vector seeded by the sha256 of the text."""

    def __init__(self, dim: int = EMBEDDING_DIM, seed: int = 0):
        self.dim, self.seed = dim, seed  # `dim` and `encoder_id`: the embeddings.Encoder protocol

    @property
    def encoder_id(self) -> str:
        return f"random-unit@{self.seed}"

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for k, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{text}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            out[k] = v / np.linalg.norm(v)
        return out


def build_feature_world(settings: Settings, embeddings: bool = True, days: Sequence | None = None) -> dict:
    """Ingest, embed (randomly), compute features for every day, apply, materialize ``days`` (default:
    all) into the online store of ``settings.feature_store``. Returns the pieces."""
    from gpl_platform.data import ingestion
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.features import pipeline
    from gpl_platform.features.store import FeastStore
    from gpl_platform.pseudo_labels.encoder import update_item_embeddings

    dataset = load_source(settings)
    warehouse = Warehouse(settings.warehouse, settings.warehouse_lock_timeout_s)
    ingestion.ingest_catalog(warehouse, dataset, settings.source_signature())
    all_days = sorted(set(dataset.events["day"]))
    ingestion.ingest_event_days(warehouse, dataset, all_days, settings.source_signature())
    if embeddings and not warehouse.table_exists("item_embeddings"):
        with warehouse.connect() as con:
            update_item_embeddings(con, dataset.items[["item_id", "text"]], RandomEncoder())
    pipeline.write_profile_features(settings, warehouse)
    days = sorted(days) if days is not None else all_days
    pipeline.write_user_features(settings, warehouse, days, all_days[0])
    pipeline.write_item_features(settings, warehouse, days, all_days[0])
    store = FeastStore(settings)
    store.apply_if_changed(pipeline.warehouse_spec(warehouse))
    store.materialize_days(days)
    return {"dataset": dataset, "warehouse": warehouse, "days": days, "store": store}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float, kill_leftovers: bool = False) -> None:
    """SIGTERM the group of ``proc``, SIGKILL it if ``proc`` outlives ``grace_s``. ``kill_leftovers``:
    SIGKILL the group even after ``proc`` stopped (children it started may still run)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            kill_leftovers = True
    if kill_leftovers:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class RunningServer:
    """A server subprocess (its own process group) that answers ``ready_url``; stopped with SIGTERM.
    ``env``: variables added to this process's environment for the server (its settings, say)."""

    def __init__(self, args, ready_url: str, env: dict | None = None, timeout_s: float = 120):
        import tempfile
        import time
        import urllib.request

        # stderr to a file, not a pipe: a pipe nobody drains fills up and freezes a server that logs a lot
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=5).read()
                return
            except OSError as exc:
                if getattr(exc, "code", None) is not None:  # an HTTP error status: it is up
                    return
                if self.proc.poll() is not None:
                    self.stderr.seek(0)
                    raise RuntimeError(f"{args[0]} exited: {self.stderr.read().decode()[-3000:]}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=20)
        self.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
