"""The Feast store wrapper: configuration from the settings, apply-if-changed, materialize,
point-in-time training retrieval.

The online store and the registry are settings (``feature_store.*``: SQLite or Redis, file or SQL
registry); every stage builds its :class:`FeastStore` from the settings it runs with, so
materialization, training, the Python client, ``feast serve`` and the scoring service all use the
same store. Paths (all under ``settings.data_dir``)::

    feast/profile_attributes.json        the generated part of the schema (attribute columns)
    feast/sources/<view>/*.parquet       offline sources written by the Dagster feature assets
    feast/feature_store.yaml             rendered config (SQLite online store)
    feast/registry.db, feast/online_store.db
    feast/redis/feature_store.yaml       the same for the Redis online store (own registry)

``import feast`` takes seconds (it imports torch): it happens inside methods only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from gpl_platform.features import parquet, repo
from gpl_platform.features.compute import day_start
from gpl_platform.features.feast_import import import_feast
from gpl_platform.features.repo import feast_dir, sources_dir, spec_path
from gpl_platform.features.schema import PROJECT, FeatureSpec

log = logging.getLogger(__name__)

DEFAULT_SERVICE = "prerank_v2"
RETIRED_SERVICES = {"prerank_v1": "prerank_v2", "prerank_scalar_v1": "prerank_scalar_v2"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


@contextmanager
def ibis_default_backend_closed(memory_limit: str | None = None) -> Iterator[None]:
    """Feast's DuckDB offline store runs its queries on ibis's default backend: a DuckDB connection that
    ibis opens on first use and never closes. Left open until the interpreter exits, it is what prints
    the ``nanobind: leaked ...`` lines after a run. A Feast call that opened it closes it here.
    ``memory_limit``: when no backend is open yet, the one opened here runs under that DuckDB limit (DuckDB's
    own default is 80% of RAM, so the feature files a materialization scans would set its memory)."""
    import ibis

    opened_here = ibis.options.default_backend is None
    try:
        if opened_here and memory_limit is not None:
            ibis.options.default_backend = ibis.duckdb.connect(memory_limit=memory_limit)
        yield
    finally:
        backend = ibis.options.default_backend
        if opened_here and backend is not None:
            try:
                backend.disconnect()
            finally:
                ibis.options.default_backend = None


__all__ = [
    "DEFAULT_SERVICE",
    "FeastStore",
    "feast_dir",
    "ibis_default_backend_closed",
    "render_config",
    "sources_dir",
    "spec_path",
    "store_dir",
]


def store_dir(settings) -> Path:
    """Registry and rendered config of the configured online store and registry: ``feast/`` for the
    default (SQLite, file registry), ``feast/redis/``, ``feast/sql_registry/``, ``feast/redis/sql_registry/``
    otherwise, so that stores of several settings can live side by side in one data directory."""
    cfg = settings.feature_store
    root = feast_dir(settings)
    if cfg.online_store != "sqlite":
        root = root / cfg.online_store
    return root / "sql_registry" if cfg.registry == "sql" else root


def render_config(settings) -> dict:
    """``feature_store.yaml`` of the configured online store and registry, with absolute paths."""
    cfg = settings.feature_store
    root = store_dir(settings)
    if cfg.registry == "file":
        registry = {"registry_type": "file", "path": str(root / "registry.db")}
    else:
        registry = {
            "registry_type": "sql",
            "path": cfg.registry_url or f"sqlite:///{root / 'registry.sqlite'}",
            "sqlalchemy_config_kwargs": {"pool_pre_ping": True},
        }
    registry["cache_ttl_seconds"] = cfg.registry_cache_ttl_s
    online = (
        {"type": "sqlite", "path": str(feast_dir(settings) / "online_store.db")}
        if cfg.online_store == "sqlite"
        else {"type": "redis", "connection_string": cfg.redis}
    )
    return {
        "project": PROJECT,
        "provider": "local",
        "registry": registry,
        "offline_store": {"type": "duckdb"},
        "online_store": online,
        # DuckDB keeps the latest row per entity of a window (not Feast's pandas step over every row of it),
        # and the online store is written a bounded number of rows at a time (each row becomes protobufs)
        "materialization": {"pull_latest_features": True, "online_write_batch_size": cfg.materialize_batch_rows},
        "entity_key_serialization_version": 3,
    }


class FeastStore:
    """One Feast feature store (registry + online store) over the parquet sources of ``settings``."""

    def __init__(self, settings):
        self.settings = settings
        self.lock = threading.RLock()  # for callers that share one store across threads (the scoring service)
        self.config = render_config(settings)
        self.config_path = store_dir(settings) / "feature_store.yaml"
        self.sources_dir = sources_dir(settings)

    def __repr__(self) -> str:
        return f"FeastStore({str(self.config_path)!r}, online={self.config['online_store']['type']})"

    @property
    def online_store_type(self) -> str:
        return self.config["online_store"]["type"]

    # ---- configuration -------------------------------------------------------------------
    def write_config(self) -> Path:
        """Write the rendered feature_store.yaml (``feast -c feature_repo -f <it> plan|serve``); returns it."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            "# Rendered by gpl_platform.features.store from the settings (feature_store.*): do not edit.\n"
            + yaml.safe_dump(self.config, sort_keys=False)
        )
        if not self.config_path.exists() or self.config_path.read_text() != text:
            tmp = self.config_path.with_name(".feature_store.yaml.tmp")
            tmp.write_text(text)
            tmp.replace(self.config_path)
        return self.config_path

    @cached_property
    def store(self):
        """The ``feast.FeatureStore`` (imports Feast on first use)."""
        import_feast()
        from feast import FeatureStore

        return FeatureStore(repo_path=str(self.config_path.parent), fs_yaml_file=self.write_config())

    def spec(self) -> FeatureSpec:
        path = spec_path(self.settings)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no feature spec yet; materialize the feast_registry asset first")
        return FeatureSpec.load(path)

    # ---- apply ---------------------------------------------------------------------------
    def definitions_digest(self, spec: FeatureSpec) -> str:
        """Hash of what apply would register: the spec, the repository files, the schema tables, the config."""
        from gpl_platform.features import schema

        h = hashlib.sha256()
        parts = [
            spec.to_json(),
            json.dumps(self.config, sort_keys=True),
            str(self.sources_dir),
            Path(schema.__file__).read_text(),
        ]
        parts += [f"{p.name}\n{p.read_text()}" for p in repo.repo_files()]
        for part in parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def apply_if_changed(self, spec: FeatureSpec, force: bool = False) -> dict:
        """``feast apply`` of ``feature_repo/`` (with ``spec``'s attribute columns) when the digest changed
        or the registry is missing. Objects registered earlier but no longer defined are removed.
        Returns ``{"applied": bool, "digest": str, "objects": [names]}``."""
        spec.save(spec_path(self.settings))
        digest = self.definitions_digest(spec)
        marker = self.config_path.parent / "applied.sha256"
        objects = repo.load_objects(self.settings)
        names = [o.name for o in objects]
        if not force and marker.exists() and marker.read_text().strip() == digest and self._registry_exists():
            return {"applied": False, "digest": digest, "objects": names}
        store = self.store
        registered = [
            *store.list_feature_services(),
            *store.list_on_demand_feature_views(),
            *store.list_feature_views(),
            *store.list_entities(),
        ]
        stale = [o for o in registered if o.name not in names]
        store.apply(objects, objects_to_delete=stale, partial=not stale)
        store.refresh_registry()
        marker.write_text(digest)
        log.info("feast apply: %d objects (%d removed), digest %s", len(objects), len(stale), digest[:12])
        return {"applied": True, "digest": digest, "objects": names, "removed": [o.name for o in stale]}

    def _registry_exists(self) -> bool:
        if self.config["registry"]["registry_type"] == "file":
            return Path(self.config["registry"]["path"]).exists()
        return bool(self.store.registry.list_feature_services(PROJECT, allow_cache=False))

    # ---- materialize ---------------------------------------------------------------------
    def materialize(self, start: datetime, end: datetime, views: Sequence[str] | None = None) -> None:
        """Load the latest row per entity with ``start <= event_timestamp < end`` into the online store."""
        # Feast prints a coloured banner per view to stdout (hundreds of lines over a range): one log line here,
        # its text at DEBUG
        printed = io.StringIO()
        with ibis_default_backend_closed(self.settings.streaming.duckdb_memory_limit), redirect_stdout(printed):
            self.store.materialize(
                start_date=start, end_date=end - _ONE_US, feature_views=list(views) if views is not None else None
            )
        log.info("materialized %s into the online store, %s .. %s", ", ".join(views or ["every view"]), start, end)
        log.debug("feast: %s", printed.getvalue())
        self._write_materialization_stamp()

    def materialize_days(self, days: Sequence[date]) -> dict:
        """Materialize the time windows of the day partitions ``days``, idempotently.

        Snapshot views: window [min(days), last + 1 day) where ``last`` is the newest written day
        (at least max(days)), so the online store always ends on the newest values even when an
        older day is re-run. Sparse and static views: from 1970, because their latest row per
        entity may predate the window. Returns the windows used.
        """
        spec = self.spec()
        written = set()
        for view, info in spec.views().items():
            if info["kind"] != "static":
                written |= parquet.written_days(self.sources_dir, view)
        last = max([*days, *written])
        end = day_start(last) + timedelta(days=1)
        windows = {}
        for view, info in spec.views().items():
            start = day_start(min(days)) if info["kind"] == "snapshot" else EPOCH
            windows.setdefault(start, []).append(view)
        for start, views in windows.items():
            self.materialize(start, end, views)
        return {"end": end.isoformat(), "windows": {s.isoformat(): v for s, v in windows.items()}}

    @property
    def _stamp_path(self) -> Path:
        return self.config_path.parent / "materialized.stamp"

    def _write_materialization_stamp(self) -> None:
        """A new token in ``materialized.stamp`` (atomically) once Feast recorded a materialization."""
        self._stamp_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._stamp_path.with_name(f".materialized.stamp.{os.getpid()}.tmp")
        tmp.write_text(f"{uuid.uuid4().hex} {datetime.now(UTC).isoformat()}\n")
        tmp.replace(self._stamp_path)

    def materialization_stamp(self) -> tuple:
        """A cheap change marker of :meth:`materialization_key` (one or two ``stat`` calls, microseconds;
        no registry read): the stamp file :meth:`materialize` replaces after each materialization (a new
        inode and time each time) and, for a file registry, the registry file (which also catches a
        ``feast materialize`` run outside this class). It changes whenever a materialization was
        recorded; it may also change without one (an apply), so a change means "read the key", not
        "rebuild"."""
        paths = [self._stamp_path]
        if self.config["registry"]["registry_type"] == "file":
            paths.append(self.config["registry"]["path"])
        stamp = []
        for path in paths:
            try:
                st = os.stat(path)
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def materialization_key(self, views: Sequence[str]) -> tuple:
        """What identifies the online rows of ``views``: every materialization interval the registry
        recorded for them (a re-run of a day appends one), read afresh."""
        self.store.refresh_registry()
        out = []
        for name in views:
            view = self.store.get_feature_view(name, allow_registry_cache=True)
            out.append((name, tuple((s.isoformat(), e.isoformat()) for s, e in view.materialization_intervals)))
        return tuple(out)

    # ---- feature services ----------------------------------------------------------------
    def feature_service(self, service: str = DEFAULT_SERVICE):
        """The registered ``FeatureService`` (a clear error for a retired or unknown name)."""
        if service in RETIRED_SERVICES:
            raise ValueError(
                f"feature service {service!r} is retired (the Python client alone applied its defaults "
                f"and derived inputs); use {RETIRED_SERVICES[service]!r}, which gives every consumer "
                "the same inputs, and retrain models trained on it"
            )
        from feast.errors import FeatureServiceNotFoundException

        try:
            return self.store.get_feature_service(service, allow_cache=True)
        except FeatureServiceNotFoundException:
            names = sorted(s.name for s in self.store.list_feature_services())
            raise ValueError(f"no feature service {service!r} in the registry; registered: {names}") from None

    def service_features(self, service: str = DEFAULT_SERVICE) -> list[tuple[str, str]]:
        """``[(feature, dtype)]`` of a service's model inputs, in the service's order."""
        return [
            (f.name, repo.dtype_name(f.dtype))
            for p in self.feature_service(service).feature_view_projections
            for f in p.features
        ]

    # ---- training retrieval --------------------------------------------------------------
    def historical_features(self, entity_df: pd.DataFrame, service: str = DEFAULT_SERVICE) -> pd.DataFrame:
        """Point-in-time-correct model inputs for rows of ``(user_id, item_id, event_time)``.

        Each row gets, per stored view, the newest row with ``event_timestamp <= event_time`` (and
        within the view's TTL): features written after an event never reach it; then Feast's
        on-demand views turn them into the service's inputs (defaults, flags, cosine), as online.
        The result has the input rows in the input order (extra input columns kept), then the
        service's features in the service's order.
        """
        missing = {"user_id", "item_id", "event_time"} - set(entity_df.columns)
        if missing:
            raise ValueError(f"entity_df lacks column(s) {sorted(missing)}")
        frame = entity_df.copy()
        frame["event_timestamp"] = pd.to_datetime(frame.pop("event_time"), utc=True).astype("datetime64[us, UTC]")
        frame["user_id"] = frame["user_id"].astype(str)
        frame["item_id"] = frame["item_id"].astype(str)
        frame["_row"] = range(len(frame))
        names = [n for n, _ in self.service_features(service)]
        with ibis_default_backend_closed(self.settings.streaming.duckdb_memory_limit):
            job = self.store.get_historical_features(entity_df=frame, features=self.feature_service(service))
            out = job.to_df().sort_values("_row").reset_index(drop=True)
        keep = [c for c in frame.columns if c != "_row"]
        out = out[keep + names].rename(columns={"event_timestamp": "event_time"})
        return out

    def online_client(self, service: str = DEFAULT_SERVICE):
        """An :class:`~gpl_platform.features.serving.OnlineFeatureClient` over this store."""
        from gpl_platform.features.serving import OnlineFeatureClient

        return OnlineFeatureClient(self, service)
