"""Feast's materialization prints a coloured banner per view to stdout; over the demo's range that was
hundreds of lines. The store turns it into one log line per call, the banner at DEBUG."""

import logging

from gpl_platform.config import load_settings
from tests.helpers import build_feature_world


def test_materialize_prints_nothing_and_logs_one_line_per_call(tmp_path, capfd, caplog):
    world = build_feature_world(load_settings({"data_dir": str(tmp_path / "data")}))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="gpl_platform.features.store"):
        world["store"].materialize_days(world["days"])
    printed = capfd.readouterr()
    assert "Materializing" not in printed.out and "Materializing" not in printed.err
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info and all(line.startswith("materialized ") for line in info), info
    assert any("Materializing" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
