"""Dagster resources: the typed settings (overridable by run config) and the warehouse."""

from __future__ import annotations

import json
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from gpl_platform.config import Settings, load_settings
from gpl_platform.warehouse import Warehouse


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
        return Warehouse(settings.warehouse, settings.warehouse_lock_timeout_s)
