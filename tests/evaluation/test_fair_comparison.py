"""The fair comparison end to end on the small simulator world: one training budget for every method, the
controls on gpl's rows and weights, gpl compared with every other method with intervals, every run's budget
recorded, and a selection run that never reads the test days."""

import numpy as np
import pytest

from gpl_platform.data.warehouse import Warehouse
from gpl_platform.features.store import FeastStore
from tests.helpers import labelled_world

OVERRIDES = {
    "anchors": {"backend": "history"},
    "calibration": {"min_samples": 50},
    "training": {"test_share": 0.15, "valid_share": 0.15},
}
METHODS = [
    "exposed_only",
    "ranker_distillation",
    "ukd",
    "gpl",
    "gpl_constant_label",
    "gpl_user_mean_label",
    "gpl_request_permuted",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = labelled_world(tmp_path_factory.mktemp("fair") / "data", OVERRIDES)
    return settings, Warehouse(settings.warehouse), FeastStore(settings)


@pytest.fixture(scope="module")
def report(world):
    from gpl_platform.evaluation.offline import run_offline_evaluation

    settings, warehouse, store = world
    return run_offline_evaluation(
        warehouse, store, settings.training, "simulator", METHODS, seeds=[0, 1], progress=False
    )


@pytest.mark.slow
def test_every_method_trains_under_one_budget_and_records_it(report):
    cfg = report["training_config"]
    window = cfg["patience_evals"] * cfg["eval_every_steps"]
    for method in METHODS:
        runs = report["runs"][method]
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:
            train = run["train"]
            assert {"steps", "epochs_run", "best_step", "best_epoch", "hit_cap"} <= set(train), method
            assert 0 < train["best_step"] <= train["steps"] and not train["hit_cap"], (method, train)
            # the same rule for every method, whatever its rows: validated every eval_every_steps steps, stopped
            # exactly patience_evals validations after its best one
            assert train["best_step"] % cfg["eval_every_steps"] == 0, (method, train)
            assert train["steps"] - train["best_step"] == window, (method, train)
    # the budget does not follow the row count: methods with more rows stop by patience alike
    rows = {m: report["runs"][m][0]["train"]["n_rows"] for m in METHODS}
    assert rows["gpl"] > rows["exposed_only"]


@pytest.mark.slow
def test_controls_train_on_gpls_rows_and_gpl_is_compared_with_intervals(report):
    gpl_rows = [(r["train"]["n_rows"], r["train"]["n_pseudo"]) for r in report["runs"]["gpl"]]
    for control in ("gpl_constant_label", "gpl_user_mean_label", "gpl_request_permuted"):
        assert [(r["train"]["n_rows"], r["train"]["n_pseudo"]) for r in report["runs"][control]] == gpl_rows
    found = {(c["against"], c["metric"]): c for c in report["comparisons"]}
    for other in set(METHODS) - {"gpl"}:
        for metric in ("unexposed_gauc", "unexposed_auc", "unexposed_hr@10"):
            entry = found[(other, metric)]
            lo, hi = entry["ci95"]
            assert lo <= entry["diff"] <= hi and entry["n_seeds"] == 2, entry
    gauc = {m: report["methods"][m]["unexposed_gauc"]["mean"] for m in METHODS}
    assert found[("exposed_only", "unexposed_gauc")]["diff"] == pytest.approx(gauc["gpl"] - gauc["exposed_only"])
    assert (
        report["method_families"]["ukd"] == "baseline"
        and report["method_families"]["gpl_request_permuted"] == "control"
    )


@pytest.mark.slow
def test_a_selection_run_never_reads_the_test_days(world, monkeypatch):
    from gpl_platform.evaluation import offline
    from gpl_platform.prerank.data import time_split

    settings, warehouse, store = world
    split = time_split(warehouse, settings.training.test_share, settings.training.valid_share)
    read = []
    for name in ("load_candidates", "load_oracle"):
        real = getattr(offline, name)
        monkeypatch.setattr(offline, name, lambda wh, days, _real=real: read.extend(days) or _real(wh, days))
    report = offline.run_offline_evaluation(
        warehouse,
        store,
        settings.training,
        "simulator",
        ["exposed_only", "gpl"],
        seeds=[0],
        progress=False,
        selection=True,
    )
    assert read and not set(read) & set(split.test_days)
    assert report["n_test_candidates"] == 0 and "ceiling" not in report
    assert np.isfinite(report["methods"]["gpl"]["valid_unexposed_gauc"]["mean"])
    assert "unexposed_gauc" not in report["methods"]["gpl"]  # no test metric without test days
