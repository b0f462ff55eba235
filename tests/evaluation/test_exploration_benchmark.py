"""The exploration slice on a benchmark world, end to end: a simulator log where a share of each day's requests
was served uniformly at random, evaluated with the oracle known. The slice's estimates (what a real log would
report, from the shown rows' clicks) must hold the oracle's truth over every candidate of the same requests
inside their intervals, for every method and for gpl's differences to the others; and the slice never trains."""

import pytest

from gpl_platform.data.warehouse import Warehouse
from gpl_platform.features.store import FeastStore
from tests.helpers import labelled_world

OVERRIDES = {
    # larger and longer than the tests' default world (60 users, 5 days): the test days hold about 90 random
    # requests, and the training days have pseudo-labels (the first days have no calibration yet)
    "simulator": {"n_users": 300, "n_days": 8, "exploration_share": 0.3},
    "anchors": {"backend": "history"},
    "calibration": {"min_samples": 50},
    "training": {"test_share": 0.2, "valid_share": 0.15},
}
METHODS = ["exposed_only", "gpl", "gpl_constant_label"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = labelled_world(tmp_path_factory.mktemp("slice") / "data", OVERRIDES)
    return settings, Warehouse(settings.warehouse)


@pytest.fixture(scope="module")
def report(world):
    from gpl_platform.evaluation.offline import run_offline_evaluation

    settings, warehouse = world
    return run_offline_evaluation(
        warehouse, FeastStore(settings), settings.training, "simulator", METHODS, seeds=[0, 1], progress=False
    )


@pytest.mark.slow
def test_the_exploration_slice_estimates_what_the_oracle_knows(report):
    section = report["exploration"]
    assert section["requests"] >= 60, section["requests"]
    for method in METHODS:
        for metric in ("gauc", "auc", "hr@10"):
            lo, hi = section["methods"][method][metric]["ci95"]
            assert lo <= section["oracle"][method][metric] <= hi, (method, metric, lo, hi, section["oracle"][method])
    for entry in (c for c in section["comparisons"] if c["metric"] == "gauc"):
        truth = section["oracle"]["gpl"]["gauc"] - section["oracle"][entry["against"]]["gauc"]
        assert entry["ci95"][0] <= truth <= entry["ci95"][1], (entry, truth)


@pytest.mark.slow
def test_the_slice_never_trains(report, world):
    _, warehouse = world
    first, last = report["split"]["train_days"][:2]
    slice_rows, production_clicks = warehouse.query(
        "SELECT count(*) FILTER (WHERE logging_policy = 'uniform_random'), "
        "count(*) FILTER (WHERE exposed AND logging_policy <> 'uniform_random' AND day BETWEEN ? AND ?) FROM events",
        [first, last],
    ).iloc[0]
    assert slice_rows > 0
    for run in report["runs"]["exposed_only"]:  # exposed_only's rows: the production traffic's clicks, no more
        assert run["train"]["n_rows"] == production_clicks
