"""Training set, pre-ranker and offline evaluation as Dagster assets, end to end on the small simulator world."""

import json

import numpy as np
import pytest

from assets.resources import GplSettings
from assets.runner import run_pipeline
from gpl_platform.config import EvaluationConfig
from gpl_platform.prerank.data import METHODS

SPEC_METRICS = ("auc", "gauc", "hr@3", "hr@5", "hr@10", "unexposed_auc", "unexposed_hr@10", "longtail_hr@10")
OVERRIDES = {
    "anchors": {"backend": "history"},
    "calibration": {"min_samples": 50},
    "training": {"seeds": [0, 1], "epochs": 3, "test_share": 0.15, "valid_share": 0.15},
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    gpl = GplSettings(data_dir=str(tmp_path_factory.mktemp("chain") / "data"), overrides_json=json.dumps(OVERRIDES))
    result = run_pipeline(resources={"gpl": gpl}, ephemeral=True)
    assert result.success
    return gpl


@pytest.mark.slow
def test_offline_evaluation_report_shape(chain):
    settings = chain.settings()
    report = json.loads((settings.data_dir / "reports" / "offline_eval.json").read_text())
    assert report["dataset"] == "simulator" and report["seeds"] == [0, 1]
    assert set(report["methods"]) == set(EvaluationConfig().methods) and set(report["methods"]) <= set(METHODS)
    for method, metrics in report["methods"].items():
        for key in (*SPEC_METRICS, "exposed_auc", "never_exposed_auc", "valid_unexposed_auc"):
            assert set(metrics[key]) == {"mean", "std"}, (method, key)
            assert 0 <= metrics[key]["mean"] <= 1 or np.isnan(metrics[key]["mean"]), (method, key)
    assert set(report["prerankers"]) == {"mlp:prerank_v2"} and report["preranker"] == "mlp:prerank_v2"
    assert {row["anchors"] for row in report["ceiling"]["rows"]} >= {"main", "history", "sid"}
    assert (settings.data_dir / "reports" / "offline_eval.md").read_text().startswith("# Offline evaluation")
    assert (settings.data_dir / "reports" / "offline_eval_metrics.png").stat().st_size > 1000
    assert "_details" not in report


@pytest.mark.slow
def test_training_set_and_model_lineage(chain):
    from gpl_platform.features.store import FeastStore
    from gpl_platform.prerank.data import attach_features
    from gpl_platform.prerank.model import PreRanker
    from gpl_platform.prerank.serving import PreRankScorer

    settings = chain.settings()
    wh = chain.warehouse()
    rows = wh.query("SELECT * FROM training_set")
    assert rows["is_pseudo"].any() and (~rows["is_pseudo"]).any()
    assert "oracle_label" not in rows.columns
    models = sorted((settings.artifacts_dir / "models").iterdir())
    assert len(models) == 1
    model, lineage = PreRanker.load(models[0])
    assert lineage["feature_service"] == "prerank_v2" and lineage["training_set"]["method"] == "gpl"
    assert lineage["training_set"]["pseudo_labels"]["calibration_versions"]
    assert lineage["metrics"]["best_valid_auc"] > 0.5
    # Serving: online features of the latest day give the same scores as the same rows offline.
    store = FeastStore(settings)
    last = wh.query("SELECT max(day) AS d FROM events")["d"].iloc[0]
    user = wh.query(f"SELECT user_id FROM events WHERE day = '{last.date()}' LIMIT 1")["user_id"].iloc[0]
    items = wh.query("SELECT item_id FROM items ORDER BY item_id LIMIT 20")["item_id"].tolist()
    scored = PreRankScorer(models[0], store).score(user, items + ["no-such-item"])
    assert scored.unknown_items == ["no-such-item"] and len(scored.scores) == 21
    import pandas as pd

    entity = pd.DataFrame(
        {
            "user_id": user,
            "item_id": items,
            "event_time": pd.Timestamp(last).tz_localize("UTC") + pd.Timedelta(hours=23),
        }
    )
    matrix, _ = attach_features(store, entity, "prerank_v2")
    np.testing.assert_allclose(scored.scores[:20], model.predict(matrix), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_set_leaves_out_a_corrupted_pseudo_label_day(chain):
    """A day whose pseudo-labels fail the blocking gate (here: saturated after the fact) is not consumed."""
    from dagster import AssetKey, DagsterInstance

    wh = chain.warehouse()
    days = wh.query("SELECT DISTINCT day FROM training_set WHERE is_pseudo ORDER BY day")["day"]
    bad = days.iloc[-1].date()
    before = wh.query(f"SELECT count(*) AS n FROM training_set WHERE is_pseudo AND day = '{bad}'")["n"].iloc[0]
    assert before > 0
    with wh.transaction() as con:
        con.execute(f"UPDATE pseudo_labels SET pseudo_label = 1.0, confidence = 1.0 WHERE day = '{bad}'")
    instance = DagsterInstance.ephemeral()
    from assets.definitions import build_definitions
    from tests.helpers import run_assets

    assert run_assets(build_definitions(gpl=chain), chain, ["training_set"], instance).success
    after = wh.query(f"SELECT count(*) AS n FROM training_set WHERE is_pseudo AND day = '{bad}'")["n"].iloc[0]
    assert after == 0
    meta = instance.fetch_materializations(AssetKey("training_set"), limit=1).records[0].asset_materialization.metadata
    assert meta["label_days_refused"].value >= 1 and str(bad) in meta["refused_days"].value
    assert "pseudo_label_mean" in meta["refused_days"].value  # the reason is shown


@pytest.mark.slow
def test_the_training_set_built_in_batches_is_the_whole_range_plan(chain):
    """write_training_set holds one batch of requests in pandas at a time, yet gives the table (rows, order,
    types) of the plan over the whole range, whatever the batch size; a method whose rows depend on other
    requests is refused."""
    import pandas as pd

    from gpl_platform.prerank import data

    settings, wh = chain.settings(), chain.warehouse()
    split = data.time_split(wh, settings.training.test_share, settings.training.valid_share)
    days = split.train_days
    label_days = set(days[1:])  # one day refused, as the gate would
    train = data.load_candidates(wh, days)
    pseudo = {"main": data.load_pseudo_labels(wh, sorted(label_days))}
    expected = data.plan_frame(data.method_plan("gpl", train, pseudo, settings.training, settings.seed), train)
    tables = {}
    for batch in (100, 2_000, 10**9):  # many batches, a few, one
        with wh.transaction() as con:
            stats = data.write_training_set(
                con, "gpl", days, label_days, settings.training, settings.seed, batch, duckdb_memory_limit="1GB"
            )
        tables[batch] = wh.query("SELECT * FROM training_set")
        assert stats["rows"] == len(expected) and stats["pseudo_rows"] == int(expected["is_pseudo"].sum())
    with wh.transaction() as con:
        wh.replace_table("training_set", expected, con)
    whole = wh.query("SELECT * FROM training_set")
    for batch, table in tables.items():
        pd.testing.assert_frame_equal(table, whole, obj=f"batch_candidates={batch}")
    with wh.transaction() as con, pytest.raises(ValueError, match="not built a batch of requests at a time"):
        data.write_training_set(con, "unexposed_negative", days, label_days, settings.training, 0)
