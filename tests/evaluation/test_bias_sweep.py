"""The bias sweep end to end on the tests' tiny simulator world: two settings through the asset graph and
the evaluation, the JSON of the issue, the plot, the results section, work shared between settings."""

import json
import math

import numpy as np
import pytest

from gpl_platform.config import PROJECT_ROOT
from gpl_platform.evaluation.bias_sweep import BASELINES, SWEEP_SETTINGS, gpl_lift, setting_overrides, summarize_setting
from gpl_platform.evaluation.bias_sweep_report import lift_table, markdown
from tests.helpers import bench_module, tiny_sweep_overrides


def _bench():
    return bench_module("bench_bias_sweep")


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


def _entry(gauc: float, auc: float, std: float = 0.002) -> dict:
    return {"unexposed_gauc": {"mean": gauc, "std": std}, "unexposed_auc": {"mean": auc, "std": std}}


def _comparison(against: str, metric: str, diff: float, lo: float, hi: float) -> dict:
    return {"method": "gpl", "against": against, "metric": metric, "diff": diff, "ci95": [lo, hi]}


def test_setting_summary_carries_comparisons_worlds_and_the_claim_rule():
    # ips is the best baseline on unexposed GAUC, exposed_only on unexposed AUC: the headline must pick ips
    methods = {
        "gpl": _entry(0.640, 0.700),
        "exposed_only": _entry(0.610, 0.690, std=0.004),
        "ips": _entry(0.625, 0.680),
        "gpl_shuffled_labels": _entry(0.630, 0.695),
        "gpl_constant_label": _entry(0.620, 0.699),
    }
    methods["gpl"]["unexposed_auc"]["std"] = 0.003
    methods["gpl"]["never_exposed_unexposed_gauc"] = {"mean": None, "std": None, "n": 512, "note": "under 1000 rows"}
    comparisons = [
        _comparison("exposed_only", "unexposed_gauc", 0.030, 0.020, 0.040),
        _comparison("ips", "unexposed_gauc", 0.015, 0.004, 0.026),
        _comparison("gpl_shuffled_labels", "unexposed_gauc", 0.010, -0.001, 0.021),
        _comparison("gpl_constant_label", "unexposed_gauc", 0.020, 0.010, 0.030),
        _comparison("ips", "unexposed_auc", 0.020, 0.010, 0.030),
    ]
    families = {"gpl": "gpl", "exposed_only": "baseline", "ips": "baseline"} | {
        m: "control" for m in ("gpl_shuffled_labels", "gpl_constant_label")
    }
    report = {
        "preranker": "mlp:prerank_v2",
        "methods": methods,
        "prerankers": {"mlp:prerank_v2": {"methods": methods}},
        "method_families": families,
        "seeds": [0, 1, 2],
    }
    protocol = {"statistics": {"exposure_rate": 0.1, "items_never_exposed_share": 0.2}}
    entry = summarize_setting(report, protocol, comparisons=comparisons, worlds=[11, 12, 13])
    assert entry["protocol"]["worlds"] == 3 and "worlds" not in protocol
    assert entry["comparisons"] == comparisons and entry["prerankers"]["mlp:prerank_v2"]["comparisons"] == comparisons
    # the best control on unexposed GAUC is gpl_shuffled_labels, and GPL's interval against it holds 0: no claim
    assert entry["prerankers"]["mlp:prerank_v2"]["gpl_helps"] == {
        "metric": "unexposed_gauc",
        "best_baseline": "ips",
        "best_control": "gpl_shuffled_labels",
        "helps": False,
    }
    lift = entry["prerankers"]["mlp:prerank_v2"]["gpl_lift"]["unexposed_auc"]
    # by hand: (0.700 - 0.690) / sqrt((0.003^2 + 0.004^2) / 2) = 0.01 / 0.0035355
    assert lift["lift"] == pytest.approx(0.010) and lift["pooled_std"] == pytest.approx(0.0035355339)
    assert lift["lift_in_pooled_std"] == pytest.approx(2.8284271)

    sweep = {"source": "simulator", "seeds": [0, 1, 2], "seconds": 1.0, "settings": {"logging_10": entry}}
    row = lift_table(sweep).iloc[0]
    assert (row["worlds"], row["best_baseline"], row["best_control"]) == (3, "ips", "gpl_shuffled_labels")
    assert row["gpl_minus_best_baseline_unexposed_gauc"] == 0.015
    assert row["gpl_minus_best_baseline_unexposed_gauc_ci95_lo"] == 0.004
    assert row["gpl_minus_best_baseline_unexposed_gauc_ci95_hi"] == 0.026
    assert row["gpl_minus_best_control_unexposed_gauc_ci95_lo"] == -0.001 and not row["gpl_helps"]
    assert row["gpl_minus_best_baseline_unexposed_auc"] == pytest.approx(0.700 - 0.680)  # the old column, vs ips
    assert row["gpl_lift_unexposed_auc"] == pytest.approx(0.010)  # the old lift over exposed_only
    text = markdown(sweep, "gpl bench bias-sweep", "abc123")
    assert "+0.0150 [+0.0040, +0.0260]" in text and "-0.0010" in text  # every comparison, with its interval
    assert "n/a (under 1000 rows, n=512)" in text  # the segment's own gauc column: its size instead of a number
    header = next(line for line in text.splitlines() if line.startswith("| setting ") and "exposure_rate" in line)
    assert "worlds" in header and "3 world(s)" in text
    # once the control's interval lies above 0, GPL helps (the summary kept its own copy of the comparisons)
    comparisons[2] = _comparison("gpl_shuffled_labels", "unexposed_gauc", 0.010, 0.001, 0.021)
    assert not lift_table(sweep).iloc[0]["gpl_helps"]
    helped = {"logging_10": summarize_setting(report, protocol, comparisons=comparisons, worlds=3)}
    assert lift_table({**sweep, "settings": helped}).iloc[0]["gpl_helps"]
    assert helped["logging_10"]["prerankers"]["mlp:prerank_v2"]["gpl_helps"]["helps"]


def test_segments_too_small_say_so_in_the_markdown():
    from gpl_platform.evaluation.bias_sweep_report import _fmt

    assert _fmt({"mean": None, "std": None, "n": 512, "note": "under 1000 rows"}) == "n/a (under 1000 rows, n=512)"
    assert _fmt({"mean": 0.61234, "std": 0.00123, "n": 4096}) == "0.6123 ± 0.0012 (n=4096)"
    assert _fmt({"mean": 0.61234, "std": 0.00123}) == "0.6123 ± 0.0012"


def test_a_sweep_from_before_the_headline_still_reads():
    # reports/bias_sweep/simulator.json has no unexposed GAUC, comparisons or worlds: the old best baseline
    # (by unexposed AUC) and the old columns, no claim
    sweep = json.loads((PROJECT_ROOT / "reports" / "bias_sweep" / "simulator.json").read_text())
    table = lift_table(sweep)
    assert len(table) == sum(len(e["prerankers"]) for e in sweep["settings"].values())
    first = sweep["settings"]["logging_10"]["prerankers"]["mlp:prerank_v1"]["methods"]
    row = table[(table["setting"] == "logging_10") & (table["preranker"] == "mlp:prerank_v1")].iloc[0]
    best = max((m for m in BASELINES if m in first), key=lambda m: first[m]["unexposed_auc"]["mean"])
    assert row["best_baseline"] == best and not row["gpl_helps"]
    assert row["gpl_minus_best_baseline_unexposed_auc"] == pytest.approx(
        first["gpl"]["unexposed_auc"]["mean"] - first[best]["unexposed_auc"]["mean"]
    )
    assert row["gpl_minus_best_baseline_unexposed_gauc"] is None or np.isnan(
        row["gpl_minus_best_baseline_unexposed_gauc"]
    )
    assert "GPL against the best baseline" in markdown(sweep, "gpl bench bias-sweep", "abc123")


@pytest.mark.slow
def test_bias_sweep_end_to_end_on_a_tiny_world(tmp_path):
    out, doc = tmp_path / "sweep.json", tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nHand-written text stays.\n")
    extra = tiny_sweep_overrides()  # history anchors, an early calibration, the gate's quantile ranges opened
    args = {
        "settings": ["popularity_25", "logging_10"],
        "seeds": [0, 1],
        "methods": ["exposed_only", "ips", "gpl"],
        "prerankers": ["mlp"],
        "data_root": tmp_path / "root",
        "extra_overrides": extra,
        "worlds": [42, 7],
        "tune": False,  # tuning has its own tests; here it would multiply the run by its trials
    }
    sweep = _bench().run("simulator", out, results_doc=doc, **args)
    saved = json.loads(out.read_text())
    assert saved["source"] == "simulator" and list(saved["settings"]) == ["popularity_25", "logging_10"]
    for name, entry in saved["settings"].items():
        protocol = entry["protocol"]
        assert protocol["overrides"]["simulator"] == SWEEP_SETTINGS["simulator"][name]["simulator"]
        assert protocol["worlds"] == 2 and set(protocol["per_world"]) == {"42", "7"}
        stats = protocol["per_world"]["42"]["statistics"]
        assert 0 < stats["exposure_rate"] < 0.35 and "items_never_exposed_share" in stats
        assert stats != protocol["per_world"]["7"]["statistics"]  # two different worlds
        assert set(entry["methods"]) == {"exposed_only", "ips", "gpl"}
        for metric in (
            "unexposed_gauc",
            "auc",
            "unexposed_auc",
            "unexposed_hr@10",
            "exposed_auc",
            "valid_unexposed_auc",
        ):
            assert {"mean", "std"} <= set(entry["methods"]["gpl"][metric]), metric
        assert set(entry["prerankers"]) == {"mlp:prerank_v2"}
        # the lift and its pooled std, by hand from every (world, seed) run (std over runs, ddof 0)
        per_run = {"gpl": [], "exposed_only": []}
        for world in (42, 7):
            report = json.loads(
                (tmp_path / "root" / name / f"world-{world}" / "reports" / "offline_eval.json").read_text()
            )
            for method in per_run:
                per_run[method] += [r["unexposed_auc"] for r in report["prerankers"]["mlp:prerank_v2"]["runs"][method]]
        assert len(per_run["gpl"]) == 4
        shape = entry["prerankers"]["mlp:prerank_v2"]
        lift = shape["gpl_lift"]["unexposed_auc"]
        assert lift["lift"] == pytest.approx(np.mean(per_run["gpl"]) - np.mean(per_run["exposed_only"]))
        assert lift["pooled_std"] == pytest.approx(
            math.sqrt((np.std(per_run["gpl"]) ** 2 + np.std(per_run["exposed_only"]) ** 2) / 2)
        )
        # gpl against each other method, with intervals over both worlds, their seeds and their requests
        found = {(c["against"], c["metric"]): c for c in entry["comparisons"]}
        assert set(found) == {
            (m, k) for m in ("exposed_only", "ips") for k in ("unexposed_gauc", "unexposed_auc", "unexposed_hr@10")
        }
        for comparison in found.values():
            lo, hi = comparison["ci95"]
            assert comparison["n_worlds"] == 2 and lo <= comparison["diff"] <= hi
        assert shape["runs_at_cap"] == 0 and len(shape["runs"]["gpl"]) == 4
        assert {r["world"] for r in shape["runs"]["gpl"]} == {42, 7} and all(
            r["steps"] > 0 for r in shape["runs"]["gpl"]
        )
        rows = entry["ceiling"]["rows"]
        assert {r["window"] for r in rows} == {"train", "valid"} and "exposed_only_auc[mlp:prerank_v2]" in rows[0]
    # the logging policy is recorded (its model was refitted on earlier days' exposed clicks), and ips reads
    # the logged propensities
    logging_10 = saved["settings"]["logging_10"]
    policy = logging_10["protocol"]["per_world"]["42"]["exposure_policy"]
    assert policy["policy"] == "logging" and policy["refits"] > 0
    assert logging_10["prerankers"]["mlp:prerank_v2"]["methods"]["ips"]
    # the logging setting shows a smaller share of each request than the popularity one
    assert (
        logging_10["protocol"]["per_world"]["42"]["statistics"]["exposure_rate"]
        < saved["settings"]["popularity_25"]["protocol"]["per_world"]["42"]["statistics"]["exposure_rate"]
    )
    # a world reuses the item vectors and cached anchors of the one before
    assert logging_10["protocol"]["per_world"]["42"]["reused_work"]["item_embeddings"] > 0
    assert (tmp_path / "sweep_lift.png").stat().st_size > 1000
    text = doc.read_text()
    assert "Hand-written text stays." in text and "bias-sweep:simulator:begin" in text and "logging_10" in text
    assert sweep["seconds"] > 0
    # resumed: the reports are read, not run again, and the same numbers come out; other seeds run again
    bench = _bench()
    resumed = bench.run("simulator", None, resume=True, **args)
    for name, entry in resumed["settings"].items():
        assert all(w["resumed"] and w["failed_checks"] is None for w in entry["protocol"]["per_world"].values())
        assert entry["methods"] == saved["settings"][name]["methods"]
    report = tmp_path / "root" / "logging_10" / "world-42" / "reports" / "offline_eval.json"
    assert bench.finished_report(report, ["exposed_only", "ips", "gpl"], ["mlp"], [0, 2]) is None
    assert bench.finished_report(report, ["exposed_only", "gpl"], ["mlp"], [0, 1]) is None
    assert bench.finished_report(report, ["gpl", "ips", "exposed_only"], ["mlp:prerank_v2"], [0, 1])
    # an untuned report does not stand in for a tuned run
    assert bench.finished_report(report, ["gpl", "ips", "exposed_only"], ["mlp:prerank_v2"], [0, 1], tune=True) is None


def test_worlds_combine_into_one_setting_with_every_runs_budget():
    from gpl_platform.evaluation.bias_sweep import combine_worlds, summarize_setting

    def report(values, cap):
        runs = {
            m: [
                {
                    "seed": s,
                    "unexposed_gauc": v + s / 100,
                    "train": {
                        "steps": 600,
                        "epochs_run": 3.5,
                        "best_step": 80,
                        "best_epoch": 0,
                        "hit_cap": cap and m == "gpl",
                    },
                }
                for s in (0, 1)
            ]
            for m, v in values.items()
        }
        return {
            "preranker": "mlp:prerank_v2",
            "seeds": [0, 1],
            "method_families": {"gpl": "gpl"},
            "prerankers": {"mlp:prerank_v2": {"runs": runs}},
        }

    combined = combine_worlds(
        {42: report({"gpl": 0.60, "exposed_only": 0.58}, False), 7: report({"gpl": 0.64, "exposed_only": 0.60}, True)}
    )
    gpl = combined["methods"]["gpl"]["unexposed_gauc"]
    # mean and std over all four (world, seed) runs, not over the worlds' means
    assert gpl["mean"] == pytest.approx(np.mean([0.60, 0.61, 0.64, 0.65]))
    assert gpl["std"] == pytest.approx(np.std([0.60, 0.61, 0.64, 0.65]))
    assert {r["world"] for r in combined["runs"]["gpl"]} == {42, 7} and combined["worlds"] == [42, 7]
    entry = summarize_setting(combined, {"overrides": {}}, comparisons=[], worlds=[42, 7])
    assert entry["protocol"]["worlds"] == 2
    shape = entry["prerankers"]["mlp:prerank_v2"]
    assert shape["runs_at_cap"] == 2  # gpl's two runs of world 7
    first = shape["runs"]["gpl"][0]
    assert first == {
        "world": 42,
        "seed": 0,
        "steps": 600,
        "epochs_run": 3.5,
        "best_step": 80,
        "best_epoch": 0,
        "hit_cap": False,
    }
