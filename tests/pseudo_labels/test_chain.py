"""The labelling chain: one object, built once from the settings, runs the four stages and returns what
each did as a typed result that matches the tables written."""

from dataclasses import FrozenInstanceError, replace

import pandas as pd
import pytest

from gpl_platform.config import load_settings
from gpl_platform.pseudo_labels.chain import LabellingChain
from gpl_platform.pseudo_labels.stage_results import (
    AnchorsResult,
    ChainResult,
    DayCalibration,
    EmbeddingsResult,
    LabelsResult,
    SimilaritiesResult,
)
from gpl_platform.pseudo_labels.stages import POOLINGS, StageSettings, StageTables


def _count(warehouse, table: str) -> int:
    return int(warehouse.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0])


def test_the_chain_reads_its_settings_once(world):
    chain = world.chain
    assert chain.settings == StageSettings.from_settings(world.settings, world.days[0])
    assert chain.settings.segments == ("history",) and chain.tables == StageTables() and chain.run_id is None
    with pytest.raises(FrozenInstanceError):
        chain.tables = StageTables("other")  # type: ignore[misc]
    # every value from its setting
    settings = load_settings(
        {
            "anchors": {"backend": "history", "k": 3, "history_max_items": 4},
            "history_max_len": 7,
            "calibration": {"min_samples": 11},
            "confidence": {"alpha": 0.25},
            "pseudo_labels": {"no_history": "population"},
            "data_dir": str(world.settings.data_dir),
        }
    )
    read = StageSettings.from_settings(settings, world.days[1])
    assert (read.anchors_k, read.anchor_history_items, read.label_history_items) == (3, 4, 7)
    assert (read.calibration.min_samples, read.confidence.alpha) == (11, 0.25)
    assert read.first_day == world.days[1] and read.artifacts_dir == world.settings.artifacts_dir
    assert read.no_history == "population" and read.segments == ("history", "no_history")
    with pytest.raises(ValueError, match="no_history must be one of"):
        replace(read, no_history="everyone")


def test_the_four_stages_return_typed_results_that_match_the_tables(world):
    warehouse, days = world.warehouse, world.days
    chain = replace(world.chain, tables=StageTables("chained"), run_id="run-1")
    done = chain.run(days)
    assert isinstance(done, ChainResult)
    anchors, embeddings, similarities, labels = done.anchors, done.embeddings, done.similarities, done.labels
    assert isinstance(anchors, AnchorsResult) and isinstance(embeddings, EmbeddingsResult)
    assert isinstance(similarities, SimilaritiesResult) and isinstance(labels, LabelsResult)

    # a variant writes its own tables, with the run's id on every partition
    assert anchors.anchors == _count(warehouse, "user_anchors__chained") == _count(warehouse, "user_anchors") > 0
    assert anchors.user_days == len(warehouse.query("SELECT DISTINCT day, user_id FROM user_anchors__chained"))
    # the anchor cache filled by the upstream run serves every history; the counters keep every count made
    assert anchors.cache_hits == anchors.distinct_histories and anchors.cache_misses == 0
    assert anchors.counters["anchors"] == anchors.anchors and anchors.serving_models == 1
    assert all(key.startswith("fallback_") for key in anchors.fallbacks)
    summary = chain.anchor_summary(days)
    assert summary.rows == anchors.anchors and 0 <= summary.fallback_share <= 1
    assert set(summary.examples["user_id"]) <= set(
        warehouse.query("SELECT user_id FROM user_anchors__chained")["user_id"]
    )

    assert embeddings.anchors == anchors.anchors == _count(warehouse, "anchor_embeddings__chained")
    assert embeddings.encoder_id == world.encoder.encoder_id and embeddings.dim == world.encoder.dim
    assert (
        similarities.candidates == _count(warehouse, "events") == _count(warehouse, "candidate_similarities__chained")
    )
    assert similarities.covered <= similarities.candidates and similarities.engine == "local"

    assert labels.rows == _count(warehouse, "pseudo_labels__chained") > 0
    assert labels.unexposed_candidates == int(
        warehouse.query("SELECT count(*) AS n FROM events WHERE NOT exposed")["n"].iloc[0]
    )
    assert labels.coverage == pytest.approx(labels.rows / labels.unexposed_candidates)
    assert labels.gaps.no_history_rule == "none" and labels.gaps.no_history_labelled == 0
    assert set(labels.gaps.days_without_calibration) <= {str(d) for d in days}
    written = warehouse.query("SELECT pseudo_label, confidence, calibration_version FROM pseudo_labels__chained")
    assert labels.distribution.pseudo_label_mean == pytest.approx(written["pseudo_label"].mean())
    assert list(labels.distribution.quantiles.index) == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert len(labels.distribution.sample) == labels.rows  # fewer labels than the sample's bound
    assert set(written["calibration_version"]) <= set(labels.calibration_versions)
    runs = warehouse.query(
        "SELECT DISTINCT table_name, run_id FROM partitions WHERE table_name LIKE '%__chained' ORDER BY table_name"
    )
    assert len(runs) == 4 and set(runs["run_id"]) == {"run-1"}
    # the main tables are the upstream run's
    assert _count(warehouse, "pseudo_labels") == 0


def test_calibrations_are_the_ones_the_labels_use(world):
    chain, days = world.chain, world.days
    chain.similarities(days)
    calibrations = chain.calibrations(days)
    assert all(isinstance(c, DayCalibration) for c in calibrations)
    assert [(c.day, c.pooling) for c in calibrations] == [(d, p) for d in days for p in POOLINGS]
    served = {c.version for c in calibrations} - {"none"}
    assert served and all(c.n_train > 0 and " .. " in c.train_window for c in calibrations if c.version != "none")
    labels = chain.labels(days)
    assert set(labels.calibration_versions) == served
    without = sorted({str(c.day) for c in calibrations if c.version == "none"})
    assert list(labels.gaps.days_without_calibration) == without
    used = world.warehouse.query("SELECT DISTINCT calibration_version AS v FROM pseudo_labels")["v"]
    assert set(used) <= served


def test_a_chain_built_from_the_settings_is_the_chain_of_its_parts(world):
    built = LabellingChain.build(
        world.settings, world.warehouse, world.chain.engine, world.generator, world.encoder, world.days[0]
    )
    assert built.settings == world.chain.settings and built.tables.variant == "main"
    assert isinstance(built.anchor_summary(world.days).examples, pd.DataFrame)
