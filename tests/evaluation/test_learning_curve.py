"""`gpl bench learning-curve` (issue 32, item 2): sizes parsed strictly, the timed stages, the reading computed from
the numbers, and the curve end to end on two tiny simulator worlds: labels only first, then the content share by
resuming them, then everything resumed without running anything."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from gpl_platform.cli.main import app
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.learning_curve import curve_methods, parse_size, parse_sizes, reading
from tests.helpers import bench_module, tiny_sweep_overrides


def test_sizes_are_parsed_strictly():
    assert parse_size("500x14") == (500, 14) and parse_size(" 5000x60 ") == (5000, 60)
    for garbage in ("500", "500x", "x14", "500x14x2", "0x14", "500X14", "5e2x14", "-5x14", "500 x 14", "500x14d"):
        with pytest.raises(ValueError, match="USERSxDAYS"):
            parse_size(garbage)
    with pytest.raises(ValueError, match="at least 3 days"):
        parse_size("500x2")
    with pytest.raises(ValueError, match="more than once: 500x14"):
        parse_sizes(["500x14", "50x5", "500x14"])


def test_a_malformed_size_is_refused_before_any_work(tmp_path, monkeypatch):
    from gpl_platform.cli import bench

    monkeypatch.setattr(bench, "_bench_module", lambda name: pytest.fail("the benchmark ran"))
    out = tmp_path / "curve.json"
    done = CliRunner().invoke(app, ["bench", "learning-curve", "--size", "500x14", "--size", "lots", "--out", str(out)])
    assert done.exit_code == 2 and "--size" in done.output and "'lots': expected USERSxDAYS" in done.output
    done = CliRunner().invoke(
        app, ["bench", "learning-curve", "--size", "50x5", "--setting", "nope", "--out", str(out)]
    )
    assert done.exit_code == 2 and "unknown setting 'nope'" in done.output
    assert not out.exists()


def test_the_graph_is_cut_into_timed_stages():
    bench = bench_module("bench_learning_curve")
    keys = bench.sweep.sweep_selection("simulator")
    sid = bench.pipeline_stages(keys, "sid", content=True)
    assert list(sid) == ["data", "generator_training", "anchor_generation", "labels", "training"]
    assert sid["generator_training"] == ["item_semantic_ids", "sid_generator"]
    assert sid["anchor_generation"] == ["user_anchors"] and "pseudo_labels" in sid["labels"]
    assert "offline_evaluation" in sid["training"] and "online_features" in sid["training"]
    # every asset of the sweep's selection runs once, but the anchor ablations no method of the curve reads
    staged = [k for stage in sid.values() for k in stage]
    assert sorted(staged) == sorted(set(keys) - set(bench.ABLATION_ASSETS)) and len(staged) == len(set(staged))
    history = bench.pipeline_stages(keys, "history", content=False)
    assert list(history) == ["data", "anchor_generation", "labels"]  # no generator, no pre-ranker


def _size(name, users, days, label_auc, content=None, generator=None):
    entry = {
        "size": name,
        "users": users,
        "days": days,
        "label_quality": {"pseudo_label_auc": label_auc, "bayes_auc": 0.8, "exposed_only_auc": 0.62},
        "cost": {"generator_training": generator and {"seconds": generator}},
        "content": None,
    }
    if content is not None:
        diff, lo, hi = content
        entry["content"] = {
            "gpl_minus_best_control": {"diff": diff, "ci95": [lo, hi]},
            "clears_bar": lo > 0,
            "gpl_minus_exposed_only": {"diff": diff + 0.01, "ci95": [lo, hi]},
        }
    return entry


def test_the_reading_is_computed_from_the_numbers():
    # given out of order: the reading orders by users x days
    sizes = [
        _size("5000x60", 5000, 60, 0.64, (0.012, 0.004, 0.020), generator=300.0),
        _size("500x14", 500, 14, 0.58, (-0.002, -0.010, 0.006), generator=10.0),
        _size("2000x30", 2000, 30, 0.61, (0.006, 0.001, 0.011), generator=60.0),
    ]
    read = reading(sizes)
    assert read["order"] == ["500x14", "2000x30", "5000x60"]
    assert read["content_share"]["rises"] and read["content_share"]["change"] == pytest.approx(0.014)
    assert read["content_share"]["spearman"] == pytest.approx(1.0) and read["label_auc"]["rises"]
    assert read["sizes_clearing_bar"] == ["2000x30", "5000x60"] and read["smallest_size_clearing_bar"] == "2000x30"
    assert read["generator_seconds"]["values"] == {"500x14": 10.0, "2000x30": 60.0, "5000x60": 300.0}
    assert read["largest_size"]["label_auc_minus_exposed_only_auc"] == pytest.approx(0.64 - 0.62)
    assert read["largest_size"]["bayes_auc_minus_label_auc"] == pytest.approx(0.8 - 0.64)
    # content share falling, nothing clears: said so, and labels alone say nothing about content
    falling = [_size("50x5", 50, 5, 0.6, (0.01, -0.01, 0.03)), _size("90x9", 90, 9, 0.59, (0.0, -0.02, 0.02))]
    read = reading(falling)
    assert read["content_share"]["rises"] is False and read["smallest_size_clearing_bar"] is None
    read = reading([_size("50x5", 50, 5, 0.6), _size("90x9", 90, 9, 0.62)])
    assert not read["content_measured"] and read["content_share"]["rises"] is None and read["label_auc"]["rises"]


def _independent_label_auc(warehouse: Warehouse, valid_days: list[str]) -> float:
    """The main pseudo-labels' AUC against the oracle on the unexposed candidates of the validation days, by SQL."""
    frame = warehouse.query(
        "SELECT o.oracle_label, p.pseudo_label FROM events e JOIN oracle_labels o USING (day, request_id, item_id) "
        "JOIN pseudo_labels p USING (day, request_id, item_id) WHERE NOT e.exposed AND e.day BETWEEN ? AND ?",
        [min(valid_days), max(valid_days)],
    )
    return float(roc_auc_score(frame["oracle_label"], frame["pseudo_label"]))


@pytest.mark.slow
def test_the_learning_curve_end_to_end_on_tiny_worlds(tmp_path, monkeypatch):
    from gpl_platform.evaluation.scores import method_comparisons

    bench = bench_module("bench_learning_curve")
    root, out = tmp_path / "root", tmp_path / "curve.json"
    args = {"worlds": [42], "seeds": [0], "data_root": root, "extra_overrides": tiny_sweep_overrides()}
    sizes = {"60x5": (60, 5), "120x6": (120, 6)}  # worlds whose training days get pseudo-labels (seed 42)

    # labels only: no pre-ranker is trained
    labels_only = bench.run(list(sizes), tmp_path / "labels.json", content=False, **args)
    saved = json.loads((tmp_path / "labels.json").read_text())
    assert [s["size"] for s in saved["sizes"]] == list(sizes) and not saved["content"]
    assert (tmp_path / "labels.png").stat().st_size > 1000
    for entry in saved["sizes"]:
        data_dir = root / "logging_10" / entry["size"] / "world-42"
        assert entry["content"] is None and entry["cost"]["training"] is None
        assert not (data_dir / "reports" / "offline_eval.json").exists()
        assert entry["cost"]["anchor_generation"]["seconds"] > 0 and entry["cost"]["generator_training"] is None
    assert not saved["reading"]["content_measured"] and saved["reading"]["smallest_size_clearing_bar"] is None

    # the content share, resuming the labels: only the evaluation runs
    curve = bench.run(list(sizes), out, resume=True, **args)
    saved = json.loads(out.read_text())
    assert saved["methods"] == curve_methods() and saved["content"] and (tmp_path / "curve.png").stat().st_size > 1000
    assert set(saved) >= {"protocol", "sizes", "reading", "seconds", "setting", "preranker", "worlds", "seeds"}
    assert saved["protocol"]["items"].startswith("fixed") and saved["protocol"]["tuned"] is False
    for entry, labelled in zip(saved["sizes"], labels_only["sizes"]):
        users, days = sizes[entry["size"]]
        world = entry["per_world"]["42"]
        assert (entry["users"], entry["days"]) == (users, days)
        assert world["resumed"] == {"labels": True, "evaluation": False}
        assert set(world["stages"]) == {"data", "anchor_generation", "labels", "training"}
        # the world has the requested users and days (read from its warehouse)
        data_dir = root / "logging_10" / entry["size"] / "world-42"
        warehouse = Warehouse(data_dir / "warehouse.duckdb")
        facts = warehouse.query("SELECT (SELECT count(*) FROM users) AS u, count(DISTINCT day) AS d FROM events")
        assert (int(facts["u"].iloc[0]), int(facts["d"].iloc[0])) == (users, days)
        assert entry["items"] == world["world"]["items"] == 300  # the tests' catalog, the same at every size
        # label quality: what the ceiling computed on the same warehouse's validation days, and by SQL
        quality = entry["label_quality"]
        assert quality["pseudo_label_auc"] == labelled["label_quality"]["pseudo_label_auc"]
        report = json.loads((data_dir / "reports" / "offline_eval.json").read_text())
        row = next(
            r
            for r in report["ceiling"]["rows"]
            if (r["window"], r["anchors"], r["segment"]) == ("valid", "main", "all")
        )
        first, last, n_days = report["split"]["valid_days"]
        valid_days = world["label_quality"]["days"]
        assert (valid_days[0], valid_days[-1], len(valid_days)) == (first, last, n_days)
        assert not world["label_quality"]["refused_days"]
        assert quality["pseudo_label_auc"] == pytest.approx(row["pseudo_label_auc_max"], abs=1e-12)
        assert quality["pseudo_label_auc"] == pytest.approx(
            _independent_label_auc(warehouse, world["label_quality"]["days"]), abs=1e-9
        )
        assert entry["validation"]["labelled_unexposed"] == row["n"] > 0
        assert quality["bayes_auc"] == pytest.approx(row["bayes_auc"], abs=1e-12) and 0.5 < quality["bayes_auc"] < 1
        assert quality["exposed_only_auc"] == pytest.approx(row["exposed_only_auc[mlp:prerank_v2]"], abs=1e-12)
        interval = quality["intervals"]["pseudo_label_auc"]
        assert interval["mean"] == pytest.approx(quality["pseudo_label_auc"], abs=1e-9)
        assert interval["ci95"][0] <= interval["mean"] <= interval["ci95"][1]
        assert quality["intervals"]["pseudo_label_gauc"]["mean"] == pytest.approx(
            quality["pseudo_label_gauc"], abs=1e-9
        )
        # the content share: gpl minus the best control, its interval the sweep's comparison of the scores
        content = entry["content"]
        assert content["best_control"] in curve_methods()[2:]
        assert content["best_control"] == max(
            curve_methods()[2:], key=lambda m: content["methods"].get(m, {}).get("mean", -1)
        )
        scores = pd.read_parquet(data_dir / "reports" / "offline_eval_scores.parquet")
        direct = {
            c["against"]: c
            for c in method_comparisons({42: scores}, "mlp:prerank_v2")
            if c["metric"] == "unexposed_gauc"
        }
        for against, key in (
            (content["best_control"], "gpl_minus_best_control"),
            ("exposed_only", "gpl_minus_exposed_only"),
        ):
            assert content[key]["diff"] == pytest.approx(direct[against]["diff"])
            assert content[key]["ci95"] == pytest.approx(direct[against]["ci95"])
            assert content[key]["above_zero"] == (direct[against]["ci95"][0] > 0)
        assert content["clears_bar"] == content["gpl_minus_best_control"]["above_zero"]
        assert entry["cost"]["training"]["seconds"] > 0 and entry["cost"]["labels"]["cpu_seconds"] >= 0
    assert curve["reading"]["content_measured"] and curve["reading"]["order"] == list(sizes)
    assert curve["reading"]["sizes_clearing_bar"] == [s["size"] for s in saved["sizes"] if s["content"]["clears_bar"]]

    # resumed: nothing runs again, the same numbers come out
    import assets.runner

    stamps = {p: os.stat(p).st_mtime_ns for p in root.rglob("*.duckdb")}
    monkeypatch.setattr(assets.runner, "run_pipeline", lambda **kw: pytest.fail("the pipeline ran again"))
    again = bench.run(list(sizes), out, resume=True, **args)
    assert {p: os.stat(p).st_mtime_ns for p in root.rglob("*.duckdb")} == stamps
    for entry, first in zip(again["sizes"], curve["sizes"]):
        assert entry["per_world"]["42"]["resumed"] == {"labels": True, "evaluation": True}
        assert entry["label_quality"] == first["label_quality"] and entry["content"] == first["content"]
        assert np.isfinite(entry["label_quality"]["pseudo_label_auc"])
