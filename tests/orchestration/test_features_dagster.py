"""The feature assets in-process with Dagster: range runs, idempotent re-runs, apply only on change."""

import numpy as np
import pyarrow.parquet as pq
from dagster import AssetKey, DagsterInstance

from assets.partitions import range_tags
from assets.resources import GplSettings
from gpl_platform.features.store import FeastStore, sources_dir
from gpl_platform.pseudo_labels.encoder import update_item_embeddings
from tests.helpers import RandomEncoder, run_assets

RANGE = range_tags("2024-01-01", "2024-01-05")


def _meta(instance, key):
    return instance.fetch_materializations(AssetKey(key), limit=1).records[0].asset_materialization.metadata


def test_definitions_load_with_the_feature_assets(dagster_defs):
    defs = dagster_defs
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"user_features", "item_features", "feast_registry", "profile_features", "online_features"} <= keys
    graph = defs.resolve_asset_graph()
    parents = {p.to_user_string() for p in graph.get(AssetKey("online_features")).parent_keys}
    assert parents == {"feast_registry", "profile_features", "user_features", "item_features"}


def test_feature_assets_range_run_and_idempotent_reruns(tmp_path, dagster_defs):
    gpl = GplSettings(data_dir=str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()

    def materialize(selection, **kwargs):
        return run_assets(dagster_defs, gpl, selection, instance, **kwargs)

    assert materialize(["item_catalog", "users"]).success
    with gpl.warehouse().connect() as con:
        items = con.execute("SELECT item_id, text FROM items").df()
        update_item_embeddings(con, items, RandomEncoder())
    assert materialize(["candidate_events"], tags=RANGE).success
    assert materialize(["profile_features", "feast_registry"]).success
    assert _meta(instance, "feast_registry")["applied"].value is True
    assert _meta(instance, "profile_features")["items_with_embedding"].value == len(items)
    # One run for the five days of every partitioned feature asset.
    assert materialize(["user_features", "item_features", "online_features"], tags=RANGE).success
    assert _meta(instance, "user_features")["partition_span"].value.startswith("2024-01-01 .. 2024-01-05")
    out = sources_dir(gpl.settings())
    assert len(list((out / "item_activity").glob("*.parquet"))) == 5

    client = FeastStore(gpl.settings()).online_client()
    users = gpl.warehouse().query("SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT 3")["user_id"].tolist()
    before = {u: client.get(u, items["item_id"][:20]).matrix for u in users}
    day3 = pq.read_table(out / "user_activity" / "2024-01-03.parquet")

    # Re-running an old day (features and online store) changes nothing: newest values stay online.
    for _ in range(2):
        assert materialize(["user_features", "online_features"], partition_key="2024-01-03").success
    assert pq.read_table(out / "user_activity" / "2024-01-03.parquet").equals(day3)
    assert "2024-01-06" in _meta(instance, "online_features")["window_end"].value
    for u in users:
        assert np.array_equal(client.get(u, items["item_id"][:20]).matrix, before[u])
    # Unchanged definitions: the registry asset does not apply again.
    assert materialize(["feast_registry"]).success
    assert _meta(instance, "feast_registry")["applied"].value is False


def test_the_pipeline_uses_the_configured_redis_online_store(tmp_path, redis_url, dagster_defs):
    """online_store is a setting of the whole pipeline: the Dagster assets materialize into Redis, and the
    Python client and the scoring service read it; the SQLite store of the same data dir stays empty."""
    import json

    from gpl_platform.prerank.serving import PreRankScorer
    from tests.helpers import train_small_model

    overrides = {"feature_store": {"online_store": "redis", "redis": redis_url}}
    gpl = GplSettings(data_dir=str(tmp_path / "data"), overrides_json=json.dumps(overrides))
    instance = DagsterInstance.ephemeral()

    def materialize(selection, **kwargs):
        return run_assets(dagster_defs, gpl, selection, instance, **kwargs)

    assert materialize(["item_catalog", "users"]).success
    with gpl.warehouse().connect() as con:
        update_item_embeddings(con, con.execute("SELECT item_id, text FROM items").df(), RandomEncoder())
    assert materialize(["candidate_events"], tags=RANGE).success
    assert materialize(
        ["profile_features", "feast_registry", "user_features", "item_features", "online_features"], tags=RANGE
    ).success
    store = FeastStore(gpl.settings())
    assert store.online_store_type == "redis" and "redis" in str(store.config_path)
    assert not (sources_dir(gpl.settings()).parent / "online_store.db").exists()
    users = gpl.warehouse().query("SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT 2")["user_id"].tolist()
    items = gpl.warehouse().query("SELECT item_id FROM items ORDER BY 1 LIMIT 30")["item_id"].tolist()
    got = store.online_client().get(users[0], items)
    assert not got.unknown_user and got.unknown_items == [] and got.matrix.any()
    from datetime import date

    from gpl_platform.data.sources import load_source

    world = {
        "store": store,
        "warehouse": gpl.warehouse(),
        "dataset": load_source(gpl.settings()),
        "days": [date(2024, 1, d) for d in range(1, 6)],
    }
    _, model_dir = train_small_model(world, "mlp")
    scorer = PreRankScorer(model_dir, store)
    np.testing.assert_array_equal(scorer.matrix(users[0], items), got.matrix)  # the service's inputs, from Redis
    assert scorer.score(users[0], items + ["ghost"]).unknown_items == ["ghost"]
