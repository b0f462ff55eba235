"""Fixtures of the labelling-stage tests: a warehouse up to the anchor vectors (made once by the assets), and
a private copy of it with the labelling chain over it."""

import json
import shutil
from dataclasses import dataclass
from datetime import date

import pytest

from assets.definitions import LABELLING_ASSETS
from gpl_platform.config import Settings, load_settings
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine import LocalEngine
from gpl_platform.pseudo_labels.chain import LabellingChain
from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder

UPSTREAM = list(LABELLING_ASSETS[: LABELLING_ASSETS.index("anchor_embeddings") + 1])
OVERRIDES = {"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}}


@dataclass(frozen=True)
class World:
    """A warehouse with events, histories, history anchors and their vectors, and what the stages need."""

    settings: Settings
    warehouse: Warehouse
    days: list[date]
    chain: LabellingChain  # over the whole timeline (its first day is the first day of events), local engine

    @property
    def generator(self):
        return self.chain.generator

    @property
    def encoder(self):
        return self.chain.encoder


@pytest.fixture(scope="package")
def upstream(tmp_path_factory):
    """The data directory of a warehouse up to ``anchor_embeddings`` (no similarities yet), made by the assets."""
    from assets.resources import GplSettings
    from assets.runner import run_pipeline

    data_dir = tmp_path_factory.mktemp("streaming") / "data"
    gpl = GplSettings(data_dir=str(data_dir), overrides_json=json.dumps(OVERRIDES))
    assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=UPSTREAM).success
    return data_dir


@pytest.fixture
def world(upstream, tmp_path) -> World:
    """A private copy of the upstream warehouse, and the labelling chain over it."""
    data_dir = tmp_path / "data"
    shutil.copytree(upstream, data_dir)
    settings = load_settings({"data_dir": str(data_dir), **OVERRIDES})
    warehouse = Warehouse(settings.warehouse)
    days = sorted(warehouse.written_days("events"))
    chain = LabellingChain.build(
        settings, warehouse, LocalEngine(), anchor_generator(settings), sentence_encoder(), days[0]
    )
    return World(settings, warehouse, days, chain)
