"""The bias sweep end to end on the tests' tiny simulator world: two settings through the asset graph and
the evaluation, the JSON of the issue, the plot, the results section, work shared between settings."""

import importlib.util
import json

import pytest

from gpl_platform.config import PROJECT_ROOT
from gpl_platform.evaluation.bias_sweep import SWEEP_SETTINGS, gpl_lift, setting_overrides


def _bench():
    spec = importlib.util.spec_from_file_location("bench_bias_sweep", PROJECT_ROOT / "bench" / "bench_bias_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_grid_and_lift_arithmetic(tmp_path):
    assert {"popularity_30", "logging_10", "logging_5", "implicit_logging_10"} <= set(SWEEP_SETTINGS["movielens-100k"])
    assert {"popularity_25", "logging_10", "logging_5"} <= set(SWEEP_SETTINGS["simulator"])
    over = setting_overrides("movielens-100k", "logging_5", tmp_path, {"movielens": {"seed_extra": 1}})
    assert over["movielens"]["exposure"] == {"policy": "logging"} and over["movielens"]["exposure_share"] == 0.05
    assert over["movielens"]["seed_extra"] == 1 and over["data_dir"] == str(tmp_path)
    assert SWEEP_SETTINGS["movielens-100k"]["logging_5"]["movielens"].get("seed_extra") is None  # grid untouched
    with pytest.raises(ValueError, match="unknown setting"):
        setting_overrides("simulator", "nope", tmp_path)
    lift = gpl_lift(
        {
            "gpl": {"unexposed_auc": {"mean": 0.62, "std": 0.003}},
            "exposed_only": {"unexposed_auc": {"mean": 0.60, "std": 0.004}},
        }
    )
    assert lift["lift"] == pytest.approx(0.02) and lift["pooled_std"] == pytest.approx((0.5 * (9 + 16)) ** 0.5 / 1000)


@pytest.mark.slow
def test_bias_sweep_end_to_end_on_a_tiny_world(tmp_path):
    out, doc = tmp_path / "sweep.json", tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nHand-written text stays.\n")
    extra = {"anchors": {"backend": "history"}, "calibration": {"min_samples": 30}, "training": {"epochs": 2}}
    sweep = _bench().run(
        "simulator",
        out,
        settings=["popularity_25", "logging_10"],
        seeds=[0, 1],
        methods=["exposed_only", "ips", "gpl"],
        prerankers=["mlp", "two_tower"],
        data_root=tmp_path / "root",
        extra_overrides=extra,
        results_doc=doc,
    )
    saved = json.loads(out.read_text())
    assert saved["source"] == "simulator" and list(saved["settings"]) == ["popularity_25", "logging_10"]
    for name, entry in saved["settings"].items():
        assert entry["protocol"]["overrides"]["simulator"] == SWEEP_SETTINGS["simulator"][name]["simulator"]
        stats = entry["protocol"]["statistics"]
        assert 0 < stats["exposure_rate"] < 0.35 and "items_never_exposed_share" in stats
        assert set(entry["methods"]) == {"exposed_only", "ips", "gpl"}
        for metric in (
            "auc",
            "unexposed_auc",
            "unexposed_hr@10",
            "exposed_auc",
            "never_exposed_auc",
            "valid_unexposed_auc",
        ):
            assert {"mean", "std"} <= set(entry["methods"]["gpl"][metric]), metric
        assert set(entry["prerankers"]) == {"mlp:prerank_v2", "two_tower:prerank_scalar_v2"}
        assert entry["prerankers"]["mlp:prerank_v2"]["gpl_lift"]["unexposed_auc"]["pooled_std"] >= 0
        rows = entry["ceiling"]["rows"]
        assert {r["window"] for r in rows} == {"train", "valid"} and "exposed_only_auc[mlp:prerank_v2]" in rows[0]
        days = entry["pseudo_label_days"]["timeline"]
        assert (
            days["days"] > 0 and days["with_labels"] + days["refused_by_gate"] + days["without_labels"] == days["days"]
        )
    # the logging policy is recorded (its model was refitted on earlier days' exposed clicks), and ips reads
    # the logged propensities
    logging_10 = saved["settings"]["logging_10"]
    assert logging_10["protocol"]["exposure_policy"]["policy"] == "logging"
    assert logging_10["protocol"]["exposure_policy"]["refits"] > 0
    assert logging_10["prerankers"]["mlp:prerank_v2"]["methods"]["ips"]
    # the logging setting shows a smaller share of each request than the popularity one
    assert (
        logging_10["protocol"]["statistics"]["exposure_rate"]
        < saved["settings"]["popularity_25"]["protocol"]["statistics"]["exposure_rate"]
    )
    # the second setting reused the first one's item vectors and cached anchors
    assert logging_10["protocol"]["reused_work"]["item_embeddings"] > 0
    assert (tmp_path / "sweep_lift.png").stat().st_size > 1000
    text = doc.read_text()
    assert "Hand-written text stays." in text and "bias-sweep:simulator:begin" in text and "logging_10" in text
    assert sweep["seconds"] > 0
    # resumed: the reports are read, not run again, and the same numbers come out; other seeds run again
    bench = _bench()
    resumed = bench.run(
        "simulator",
        None,
        settings=["popularity_25", "logging_10"],
        seeds=[0, 1],
        methods=["exposed_only", "ips", "gpl"],
        prerankers=["mlp", "two_tower"],
        data_root=tmp_path / "root",
        extra_overrides=extra,
        resume=True,
    )
    for name, entry in resumed["settings"].items():
        assert entry["protocol"]["resumed"] is True and entry["protocol"]["failed_checks"] is None
        assert entry["methods"] == saved["settings"][name]["methods"]
    report = tmp_path / "root" / "logging_10" / "reports" / "offline_eval.json"
    assert bench.finished_report(report, ["exposed_only", "ips", "gpl"], ["mlp", "two_tower"], [0, 2]) is None
    assert bench.finished_report(report, ["exposed_only", "gpl"], ["mlp", "two_tower"], [0, 1]) is None
    assert bench.finished_report(report, ["gpl", "ips", "exposed_only"], ["two_tower", "mlp:prerank_v2"], [0, 1])
