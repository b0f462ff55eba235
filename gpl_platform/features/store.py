"""The Feast store wrapper: configuration with absolute paths, apply-if-changed, materialize,
point-in-time training retrieval.

Paths (all under ``settings.data_dir``)::

    feast/spec.json                      the FeatureSpec (attribute columns of the source)
    feast/sources/<view>/*.parquet       offline sources written by the Dagster feature assets
    feast/repo/feature_store.yaml        rendered config (SQLite online store): feast -c feast/repo serve
    feast/registry.db, feast/online_store.db
    feast/redis/...                      the same for the Redis online store (own registry)

``import feast`` takes seconds (it imports torch): it happens inside methods only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from gpl_platform.config import PROJECT_ROOT, Settings
from gpl_platform.features import definitions as definitions_module
from gpl_platform.features import parquet
from gpl_platform.features.compute import day_start
from gpl_platform.features.definitions import DEFAULT_SERVICE, ENTITY_KEYS, build_definitions, service_features
from gpl_platform.features.schema import FeatureSpec

log = logging.getLogger(__name__)

TEMPLATE = PROJECT_ROOT / "feature_repo" / "feature_store.yaml"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)


@contextmanager
def ibis_default_backend_closed() -> Iterator[None]:
    """Feast's DuckDB offline store runs its queries on ibis's default backend: a DuckDB connection that
    ibis opens on first use and never closes. Left open until the interpreter exits, it is what prints
    the ``nanobind: leaked ...`` lines after a run. A Feast call that opened it closes it here."""
    import ibis

    opened_here = ibis.options.default_backend is None
    try:
        yield
    finally:
        backend = ibis.options.default_backend
        if opened_here and backend is not None:
            try:
                backend.disconnect()
            finally:
                ibis.options.default_backend = None


def feast_dir(settings: Settings) -> Path:
    return settings.data_dir / "feast"


def sources_dir(settings: Settings) -> Path:
    return feast_dir(settings) / "sources"


def spec_path(settings: Settings) -> Path:
    return feast_dir(settings) / "spec.json"


def render_config(settings: Settings, redis_url: str | None = None) -> dict:
    """The feature_store.yaml template with absolute paths; Redis online store if ``redis_url``."""
    root = feast_dir(settings) / ("redis" if redis_url else "")
    text = string.Template(TEMPLATE.read_text()).safe_substitute(GPL_FEAST_DIR=str(root))
    config = yaml.safe_load(text)
    if redis_url:
        config["online_store"] = {"type": "redis", "connection_string": redis_url}
    return config


class FeastStore:
    """One Feast feature store (registry + online store) over the parquet sources of ``settings``.

    ``redis_url`` (``"127.0.0.1:6379"``) selects the Redis online store; it gets its own registry
    under ``feast/redis/`` so that SQLite and Redis stores can live side by side.
    """

    def __init__(self, settings: Settings, redis_url: str | None = None):
        self.settings = settings
        self.redis_url = redis_url
        self.config = render_config(settings, redis_url)
        self.repo_dir = feast_dir(settings) / ("redis" if redis_url else "") / "repo"
        self.sources_dir = sources_dir(settings)

    def __repr__(self) -> str:
        return f"FeastStore({str(self.repo_dir)!r}, online={self.config['online_store']['type']})"

    # ---- configuration -------------------------------------------------------------------
    def write_repo(self) -> Path:
        """Write the rendered feature_store.yaml (for ``feast -c <repo_dir> serve``); returns the dir."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        target = self.repo_dir / "feature_store.yaml"
        text = "# Rendered from feature_repo/feature_store.yaml by gpl_platform.features.store: do not edit.\n" + \
            yaml.safe_dump(self.config, sort_keys=False)
        if not target.exists() or target.read_text() != text:
            tmp = target.with_name(".feature_store.yaml.tmp")
            tmp.write_text(text)
            tmp.replace(target)
        return self.repo_dir

    @cached_property
    def store(self):
        """The ``feast.FeatureStore`` (imports Feast on first use)."""
        from feast import FeatureStore

        return FeatureStore(repo_path=str(self.write_repo()))

    def spec(self) -> FeatureSpec:
        path = spec_path(self.settings)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no feature spec yet; materialize the feast_registry asset first")
        return FeatureSpec.load(path)

    # ---- apply ---------------------------------------------------------------------------
    def definitions_digest(self, spec: FeatureSpec) -> str:
        """Hash of what apply would register: the spec, the definitions code and the config."""
        h = hashlib.sha256()
        for part in (spec.to_json(), inspect.getsource(definitions_module), json.dumps(self.config, sort_keys=True),
                     str(self.sources_dir)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def apply_if_changed(self, spec: FeatureSpec, force: bool = False) -> dict:
        """``feast apply`` the definitions when their digest changed (or the registry is missing).

        Objects registered earlier but no longer defined are removed. Returns
        ``{"applied": bool, "digest": str, "objects": [names]}``.
        """
        spec.save(spec_path(self.settings))
        digest = self.definitions_digest(spec)
        marker = self.repo_dir / "applied.sha256"
        registry = Path(self.config["registry"]["path"])
        objects = build_definitions(spec, self.sources_dir)
        names = [o.name for o in objects]
        if not force and registry.exists() and marker.exists() and marker.read_text().strip() == digest:
            return {"applied": False, "digest": digest, "objects": names}
        store = self.store
        stale = []
        if registry.exists():
            stale = [o for o in (*store.list_feature_services(), *store.list_feature_views(), *store.list_entities())
                     if o.name not in names]
        store.apply(objects, objects_to_delete=stale, partial=not stale)
        store.refresh_registry()
        self.write_repo()
        marker.write_text(digest)
        log.info("feast apply: %d objects (%d removed), digest %s", len(objects), len(stale), digest[:12])
        return {"applied": True, "digest": digest, "objects": names, "removed": [o.name for o in stale]}

    # ---- materialize ---------------------------------------------------------------------
    def materialize(self, start: datetime, end: datetime, views: Sequence[str] | None = None) -> None:
        """Load the latest row per entity with ``start <= event_timestamp < end`` into the online store."""
        with ibis_default_backend_closed():
            self.store.materialize(start_date=start, end_date=end - _ONE_US,
                                   feature_views=list(views) if views is not None else None)

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

    # ---- training retrieval --------------------------------------------------------------
    def historical_features(self, entity_df: pd.DataFrame, service: str = DEFAULT_SERVICE,
                            fill_defaults: bool = True) -> pd.DataFrame:
        """Point-in-time-correct features for rows of ``(user_id, item_id, event_time)``.

        Each row gets, per view, the newest feature row with ``event_timestamp <= event_time``
        (and within the view's TTL): features written after an event never reach it. The result
        has the input rows in the input order (extra input columns kept), then the service's
        features; with ``fill_defaults`` missing values are filled and flagged
        (``u_known``, ``i_known``) exactly as the online client does.
        """
        from gpl_platform.features.serving import finalize

        missing = {"user_id", "item_id", "event_time"} - set(entity_df.columns)
        if missing:
            raise ValueError(f"entity_df lacks column(s) {sorted(missing)}")
        frame = entity_df.copy()
        frame["event_timestamp"] = pd.to_datetime(frame.pop("event_time"), utc=True).astype("datetime64[us, UTC]")
        frame["user_id"] = frame["user_id"].astype(str)
        frame["item_id"] = frame["item_id"].astype(str)
        frame["_row"] = range(len(frame))
        fs = self.store
        with ibis_default_backend_closed():
            job = fs.get_historical_features(entity_df=frame, features=fs.get_feature_service(service))
            out = job.to_df().sort_values("_row").drop(columns="_row").reset_index(drop=True)
        out = out.rename(columns={"event_timestamp": "event_time"})
        if not fill_defaults:
            return out
        return finalize(out, self.spec(), service)

    def online_client(self, service: str = DEFAULT_SERVICE, reader: str = "auto"):
        """An :class:`~gpl_platform.features.serving.OnlineFeatureClient` over this store."""
        from gpl_platform.features.serving import OnlineFeatureClient

        return OnlineFeatureClient(self, service, reader)

    def service_features(self, service: str = DEFAULT_SERVICE) -> dict[str, list[str]]:
        return service_features(self.spec(), service)

    @staticmethod
    def entity_key(view_entity: str) -> str:
        return ENTITY_KEYS[view_entity]
