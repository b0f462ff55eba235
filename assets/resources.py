"""Dagster resources: the typed settings (overridable by run config) and what assets use from them,
each a ``ConfigurableResource`` built per run: the DuckDB warehouse, the Feast store, the frozen
sentence encoder and the anchor generators. ``gpl_resources(settings)`` gives the whole set.
"""

import json
import warnings
from typing import Any

from dagster import ConfigurableResource, ResourceDependency
from pydantic import Field, PrivateAttr, SecretStr

from gpl_platform.config import Settings, load_settings
from gpl_platform.data.warehouse import Warehouse


def ignore_dagster_internal_deprecations() -> None:
    """Dagster 1.13 reads its own deprecated ``InitResourceContext.dagster_run`` when it initializes a nested
    resource with config (every resource here depends on ``GplSettings``): the warning is Dagster's, raised from
    its own module, and says nothing a user can act on. Ignored only when a ``dagster`` module raises it: a call of
    ours would still warn (our code reads the run as ``context.run``)."""
    warnings.filterwarnings(
        "ignore",
        message=r"InitResourceContext\.dagster_run is deprecated",
        category=DeprecationWarning,
        module="dagster",
    )


ignore_dagster_internal_deprecations()


class GplSettings(ConfigurableResource):
    """gpl_platform.config.Settings, with run-config overrides on top of env vars and defaults.

    Common keys are fields; anything else goes in ``overrides_json`` as nested JSON, e.g.
    ``{"movielens": {"exposure_share": 0.5}}``.
    """

    source: str | None = Field(None, description="movielens-100k | simulator | contract")
    data_dir: str | None = None
    warehouse_path: str | None = None
    seed: int | None = None
    contract_path: str | None = None
    overrides_json: str = Field("{}", description="nested Settings overrides as JSON")

    @classmethod
    def from_settings(cls, settings: Settings) -> "GplSettings":
        """The resource whose ``settings()`` are ``settings`` (a command's, passed as a value): what differs
        from the environment's settings goes in ``overrides_json``, so a run's config shows what the command
        changed. Secrets are not copied into it: the resource reads them from the environment, as the
        command did (settings whose secret differs from the environment's are refused)."""
        try:
            environment = load_settings().model_dump()
        except ValueError:  # the environment alone may be invalid (a command's option mends it): every value
            environment = {}
        changed = _changes(environment, settings.model_dump(), settings.model_dump(mode="json"))
        gpl = cls(overrides_json=json.dumps(changed))
        if gpl.settings() != settings:
            raise ValueError(
                "these settings differ from the environment's in a secret, which a run's config does not carry"
            )
        return gpl

    def settings(self) -> Settings:
        overrides: dict[str, Any] = json.loads(self.overrides_json or "{}")
        for key in ("source", "data_dir", "warehouse_path", "seed"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        if self.contract_path is not None:
            overrides.setdefault("contract", {})["path"] = self.contract_path
        return load_settings(overrides)

    def warehouse(self) -> Warehouse:
        settings = self.settings()
        return Warehouse.for_settings(settings)


def _changes(base: dict, new: dict, new_json: dict) -> dict:
    """The entries of ``new`` that differ from ``base`` (nested dicts key by key), as their JSON values;
    secrets left out."""
    out = {}
    for key, value in new.items():
        old = base.get(key)
        if value == old or isinstance(value, SecretStr):
            continue
        out[key] = (
            _changes(old, value, new_json[key]) if isinstance(value, dict) and isinstance(old, dict) else new_json[key]
        )
    return out


class WarehouseResource(ConfigurableResource):
    """The DuckDB warehouse of the configured ``data_dir`` (one writing process at a time: every asset
    that uses it is in the ``duckdb_warehouse`` concurrency pool)."""

    gpl: ResourceDependency[GplSettings]

    def get(self) -> Warehouse:
        return self.gpl.warehouse()


class FeatureStoreResource(ConfigurableResource):
    """The project's Feast store (offline parquet sources, registry, online store) under ``data_dir``."""

    gpl: ResourceDependency[GplSettings]
    _store: Any = PrivateAttr(default=None)

    def get(self):
        if self._store is None:
            from gpl_platform.features.store import FeastStore  # imports Feast (and torch): only when used

            self._store = FeastStore(self.gpl.settings())
        return self._store


class EncoderResource(ConfigurableResource):
    """The frozen sentence encoder (``encoder_dir``, default: all-MiniLM-L6-v2 from its PyPI package),
    loaded on first use in the run."""

    gpl: ResourceDependency[GplSettings]
    _encoder: Any = PrivateAttr(default=None)

    def get(self):
        if self._encoder is None:
            from gpl_platform.pseudo_labels.encoder import SentenceEncoder

            encoder_dir = self.gpl.settings().encoder_dir
            self._encoder = SentenceEncoder(str(encoder_dir) if encoder_dir else None)
        return self._encoder


class AnchorGeneratorResource(ConfigurableResource):
    """Anchor generators by backend (``anchors.backend`` by default), built on first use in the run:
    SmolLM2 loads its weights, ``sid`` needs the materialized semantic IDs."""

    gpl: ResourceDependency[GplSettings]
    _generators: dict = PrivateAttr(default_factory=dict)

    def get(self, backend: str | None = None):
        from gpl_platform.pseudo_labels.model_loading import build_anchor_generator

        settings = self.gpl.settings()
        backend = backend or settings.anchors.backend
        if backend not in self._generators:
            self._generators[backend] = build_anchor_generator(settings, backend)
        return self._generators[backend]


class EngineResource(ConfigurableResource):
    """Where the GPL stages' batch work runs (``engine: local | ray``, docs/SCALING.md); one engine per
    process and configuration, so a Ray connection and its actors are reused across the run's steps."""

    gpl: ResourceDependency[GplSettings]

    def get(self):
        from gpl_platform.engine import make_engine

        return make_engine(self.gpl.settings())


def gpl_resources(gpl: GplSettings | None = None) -> dict[str, ConfigurableResource]:
    """Every resource the definitions use, all reading one settings resource."""
    gpl = gpl or GplSettings()
    return {
        "gpl": gpl,
        "warehouse": WarehouseResource(gpl=gpl),
        "feature_store": FeatureStoreResource(gpl=gpl),
        "encoder": EncoderResource(gpl=gpl),
        "anchor_generator": AnchorGeneratorResource(gpl=gpl),
        "engine": EngineResource(gpl=gpl),
    }
