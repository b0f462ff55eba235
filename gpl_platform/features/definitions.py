"""Feast objects (entities, sources, feature views, feature services) built from a FeatureSpec.

Naming: entity ``user``/``item``; source ``<view>_source``; view ``<view>``; services
``<purpose>_v<N>``. A service version is never changed in place: a new feature set gets a new
version (``prerank_v2``) and the old one stays until its consumers have moved.

Feast is imported inside :func:`build_definitions` only (``import feast`` takes seconds).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from gpl_platform.features.parquet import view_glob
from gpl_platform.features.schema import EMB, FLOAT, INT, TIMESTAMP_FIELD, FeatureSpec

ENTITY_KEYS = {"user": "user_id", "item": "item_id"}
# A snapshot row of day D describes D until the next snapshot: one day. Sparse/static rows never expire.
SNAPSHOT_TTL = timedelta(days=1)

# Versioned feature services: {name: (description, views, exclude dtypes)}
SERVICES: dict[str, tuple[str, list[str], set[str]]] = {
    "prerank_v1": ("Pre-ranker features v1: user/item activity, profiles, history and content embeddings.",
                   ["user_activity", "user_history", "user_profile", "item_activity", "item_profile"], set()),
    "prerank_scalar_v1": ("Pre-ranker features v1 without embeddings (for tree models and quick baselines).",
                          ["user_activity", "user_profile", "item_activity", "item_profile"], {EMB}),
}
DEFAULT_SERVICE = "prerank_v1"


def service_features(spec: FeatureSpec, service: str = DEFAULT_SERVICE) -> dict[str, list[str]]:
    """``{view: [feature, ...]}`` of a service, in order (no Feast import)."""
    _, views, exclude = SERVICES[service]
    all_views = spec.views()
    return {v: [n for n, t in all_views[v]["features"].items() if t not in exclude] for v in views}


def _dtype(name: str):
    from feast.types import Array, Float32, Float64, Int64, String

    return {INT: Int64, FLOAT: Float64, "String": String, EMB: Array(Float32)}[name]


def build_definitions(spec: FeatureSpec, sources_dir: Path) -> list:
    """All Feast objects of the repository, ready for ``FeatureStore.apply``."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import String

    entities = {name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING,
                             description=f"{name} of the recommendation catalog ({key})")
                for name, key in ENTITY_KEYS.items()}
    views = {}
    for view, info in spec.views().items():
        key = ENTITY_KEYS[info["entity"]]
        source = FileSource(name=f"{view}_source", path=view_glob(sources_dir, view), file_format=ParquetFormat(),
                            timestamp_field=TIMESTAMP_FIELD,
                            description=f"{info['kind']} parquet written by the Dagster feature assets")
        views[view] = FeatureView(
            name=view, entities=[entities[info["entity"]]],
            ttl=SNAPSHOT_TTL if info["kind"] == "snapshot" else timedelta(0),
            schema=[Field(name=key, dtype=String)]
            + [Field(name=n, dtype=_dtype(t)) for n, t in info["features"].items()],
            source=source, online=True, tags={"kind": info["kind"]},
            description=f"{info['kind']} features of {info['entity']}s")
    services = []
    for name, (description, _, _) in SERVICES.items():
        wanted = service_features(spec, name)
        projections = [views[v] if len(feats) == len(views[v].features) else views[v][feats]
                       for v, feats in wanted.items()]
        services.append(FeatureService(name=name, features=projections, description=description,
                                       tags={"version": name.rsplit("_v", 1)[1]}))
    return [*entities.values(), *views.values(), *services]
