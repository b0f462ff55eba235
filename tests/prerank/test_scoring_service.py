"""The pre-rank scoring service: same inputs as training for every pre-ranker shape, the item side kept
in memory and rebuilt when a newer day is materialized, `gpl serve` over HTTP with clear 4xx answers
to bad requests, and a hot reload of a newer model under concurrent requests without an error."""

import json
import os
import shutil
import sys
import threading
import time
import urllib.request
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import load_settings
from gpl_platform.features import pipeline
from gpl_platform.prerank.data import attach_features
from gpl_platform.prerank.serving import PreRankScorer
from tests.helpers import RunningServer, build_feature_world, free_port, post_json, train_small_model

SHAPES = ("mlp", "two_tower", "cold")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """The service sets torch's intra-op threads for its process (serving.torch_threads): in the test
    process that would change every later test's float rounding, so the count is put back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The world with every day but the last three in the online store (newer days come later)."""
    settings = load_settings({"data_dir": str(tmp_path_factory.mktemp("scoring") / "data")})
    from gpl_platform.data.sources import load_source

    all_days = sorted(set(load_source(settings).events["day"]))
    world = build_feature_world(settings, days=all_days[:-3])
    world["all_days"] = all_days
    world["models"] = {shape: train_small_model(world, shape) for shape in SHAPES}
    return world


def _offline_matrix(world, user, items, day):
    at = pd.Timestamp(day.isoformat(), tz="UTC") + timedelta(hours=23)
    entity = pd.DataFrame({"user_id": user, "item_id": items, "event_time": at})
    return attach_features(world["store"], entity, "prerank_v2")[0]


def _request(world, n=25):
    ds = world["dataset"]
    user = ds.events["user_id"].iloc[0]
    items = ds.items["item_id"].tolist()
    rng = np.random.default_rng(0)
    # known items, items outside the model vocabulary (the last 5) and ids the store has never seen
    return user, [*rng.choice(items[:-5], n, replace=False).tolist(), *items[-2:], "ghost-item", "ghost-item-2"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache_items", [True, False])
def test_scores_use_the_training_inputs_for_every_shape(world, shape, cache_items):
    model, model_dir = world["models"][shape]
    scorer = PreRankScorer(model_dir, world["store"], cache_items=cache_items)
    user, items = _request(world)
    offline = _offline_matrix(world, user, items, world["days"][-1])
    np.testing.assert_array_equal(scorer.matrix(user, items), offline)  # the same inputs, bit for bit
    scored = scorer.score(user, items)
    np.testing.assert_allclose(scored.scores, model.predict(offline, [user] * len(items), items), rtol=1e-5, atol=1e-7)
    assert scored.unknown_items == ["ghost-item", "ghost-item-2"] and not scored.unknown_user
    assert scored.model_version == f"{shape}-0" and scored.feature_service == "prerank_v2"
    if shape == "mlp":
        assert scored.out_of_vocabulary_items == [] and not scored.out_of_vocabulary_user
    else:  # the catalog's last items and the ghosts are outside this model's vocabulary: the OOV row
        assert scored.out_of_vocabulary_items == [*items[-4:-2], "ghost-item", "ghost-item-2"]
    ghost = scorer.score("ghost-user", items[:3])
    assert ghost.unknown_user and ghost.out_of_vocabulary_user == model.uses_ids
    np.testing.assert_array_equal(
        scorer.matrix("ghost-user", items[:3]), _offline_matrix(world, "ghost-user", items[:3], world["days"][-1])
    )


def _materialize_day(world, day):
    settings, warehouse = world["store"].settings, world["warehouse"]
    pipeline.write_user_features(settings, warehouse, [day], world["all_days"][0])
    pipeline.write_item_features(settings, warehouse, [day], world["all_days"][0])
    world["store"].materialize_days([day])


def _materialize_next_day(world):
    """Write and materialize the day after the newest one in the online store; that day."""
    new_day = world["all_days"][len(world["days"])]
    _materialize_day(world, new_day)
    world["days"] = world["all_days"][: len(world["days"]) + 1]
    return new_day


def _newest_materialization(world) -> dict:
    from gpl_platform.prerank.serving import ITEM_VIEWS, materialization_version

    return materialization_version(world["store"].materialization_key(ITEM_VIEWS))


def test_item_side_is_rebuilt_when_a_newer_day_is_materialized(world, tmp_path):
    _, model_dir = world["models"]["mlp"]
    scorer = PreRankScorer(model_dir, world["store"])
    before = scorer.items.version
    assert scorer.refresh_items() is False  # nothing new: the same item side
    user, items = _request(world)
    old = _offline_matrix(world, user, items, world["days"][-1])
    new_day = _materialize_next_day(world)
    assert scorer.refresh_items() is True
    assert scorer.items.version["id"] != before["id"] and scorer.items.version["through"] > before["through"]
    new = _offline_matrix(world, user, items, new_day)
    assert not np.array_equal(new, old)  # the day changed item activity...
    np.testing.assert_array_equal(scorer.matrix(user, items), new)  # ...and the scorer serves the new values


def test_the_first_score_after_a_materialization_uses_it(world):
    """No poll in between: a request right after a newer day is materialized (or a day re-run) is scored
    on the item side of that materialization, never on the older one with the newer user row."""
    from gpl_platform.prerank.service import ScoringService

    model, model_dir = world["models"]["mlp"]
    scorer = PreRankScorer(model_dir, world["store"])
    service = ScoringService(world["store"].settings, model=model_dir, refresh_interval_s=3600)  # not started
    before = scorer.items.version
    user, items = _request(world)
    assert scorer.score(user, items).features_version == before  # an unchanged stamp: no rebuild
    new_day = _materialize_next_day(world)
    newest = _newest_materialization(world)
    assert newest["through"] > before["through"]
    assert scorer.score(user, items).features_version == newest
    answer = service.score(user, items)
    assert answer["features_version"] == newest and service.health()["items_rebuilt_on_request"] == 1
    np.testing.assert_allclose(
        answer["scores"], model.predict(_offline_matrix(world, user, items, new_day)), rtol=1e-5, atol=1e-7
    )
    _materialize_day(world, new_day)  # a re-run of the day: a newer materialization with the same end
    rerun = _newest_materialization(world)
    assert rerun["id"] != newest["id"] and scorer.score(user, items).features_version == rerun
    assert scorer.refreshes_on_request == 2 and scorer.refresh_errors_on_request == 0


def test_bad_requests_get_a_clear_4xx(world):
    from gpl_platform.prerank.service import RequestError, check_request

    check_request("u1", ["a", "b"], 10)
    for args, status, fragment in [
        (("u1", [], 10), 422, "empty"),
        (("u1", ["a"] * 3, 10), 422, "repeats"),
        (("u1", list("abcdefghijk"), 10), 413, "at most 10"),
        ((" ", ["a"], 10), 422, "user_id is empty"),
        (("u1", ["a", ""], 10), 422, "empty id"),
    ]:
        with pytest.raises(RequestError, match=fragment) as info:
            check_request(*args)
        assert info.value.status == status


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    """`gpl serve` on a free port over a models directory holding the mlp model."""
    models = tmp_path_factory.mktemp("served-models")
    shutil.copytree(world["models"]["mlp"][1], models / "mlp-0")
    port = free_port()
    env = {"GPL_DATA_DIR": str(world["store"].settings.data_dir), "GPL_SERVING__MAX_ITEMS": "500"}
    server = RunningServer(
        [
            str(os.path.join(os.path.dirname(sys.executable), "gpl")),
            "serve",
            "--port",
            str(port),
            "--model",
            str(models),
            "--refresh-interval",
            "0.5",
        ],
        f"http://127.0.0.1:{port}/health",
        env=env,
        timeout_s=180,
    )
    yield {"url": f"http://127.0.0.1:{port}", "models": models, "server": server}
    server.stop()


def _health(url):
    return json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())


def test_http_scores_health_and_bad_requests(world, served):
    url = served["url"]
    health = _health(url)
    assert health["model_version"] == "mlp-0" and health["feature_service"] == "prerank_v2"
    assert health["items_cached"] == len(world["dataset"].items) and health["online_store"] == "sqlite"
    user, items = _request(world)
    status, answer = post_json(f"{url}/score", {"user_id": user, "item_ids": items})
    assert status == 200, answer
    local = PreRankScorer(world["models"]["mlp"][1], world["store"]).score(user, items)
    np.testing.assert_allclose(answer["scores"], local.scores, rtol=1e-6)
    assert answer["unknown_items"] == ["ghost-item", "ghost-item-2"] and answer["model_version"] == "mlp-0"
    assert answer["features_version"]["id"] == local.features_version["id"]
    bad = [
        ({"user_id": user}, 422, "item_ids"),
        ({"item_ids": items}, 422, "user_id"),
        ({"user_id": 7, "item_ids": items}, 422, "user_id"),
        ({"user_id": user, "item_ids": "a,b"}, 422, "item_ids"),
        ({"user_id": user, "item_ids": [1, 2]}, 422, "item_ids"),
        ({"user_id": user, "item_ids": []}, 422, "empty"),
        ({"user_id": user, "item_ids": ["a", "a"]}, 422, "repeats"),
        ({"user_id": user, "item_ids": [f"i{k}" for k in range(501)]}, 413, "at most 500"),
        ({"user_id": user, "item_ids": items, "extra": 1}, 422, "extra"),
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 422, "invalid request"),
        (b"", 422, "invalid request"),
    ]
    for body, want, fragment in bad:
        status, answer = post_json(f"{url}/score", body)
        assert status == want and fragment in json.dumps(answer), (body, status, answer)
        assert set(answer) == {"error", "detail"}


def test_http_service_follows_a_newer_materialization(world, served):
    url = served["url"]
    before = _health(url)["features_version"]
    user, items = _request(world)
    new_day = _materialize_next_day(world)
    # at once, not after the service's poll: the request itself sees the newer materialization
    status, answer = post_json(f"{url}/score", {"user_id": user, "item_ids": items})
    assert status == 200, answer
    assert answer["features_version"] == _newest_materialization(world)
    assert answer["features_version"]["through"] > before["through"]
    model, _ = world["models"]["mlp"]
    expected = model.predict(_offline_matrix(world, user, items, new_day))
    np.testing.assert_allclose(answer["scores"], expected, rtol=1e-5, atol=1e-7)


def test_hot_reload_of_a_newer_model_drops_no_request(world, served):
    url, models = served["url"], served["models"]
    user, items = _request(world)
    outcomes, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, answer = post_json(f"{url}/score", {"user_id": user, "item_ids": items})
            outcomes.append((status, answer.get("model_version") if status == 200 else answer))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        staged = models / ".staging"
        shutil.copytree(world["models"]["two_tower"][1], staged)
        staged.rename(models / "two_tower-0")  # a new version appears whole, as prerank_model writes it
        deadline = time.monotonic() + 120
        while _health(url)["model_version"] != "two_tower-0":
            assert time.monotonic() < deadline, _health(url)
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    errors = [o for o in outcomes if o[0] != 200]
    assert not errors, errors[:3]
    versions = [v for _, v in outcomes]
    assert "mlp-0" in versions and "two_tower-0" in versions
    assert versions.index("two_tower-0") > versions.index("mlp-0")
    assert _health(url)["model_reloads"] >= 1 and _health(url)["model_shape"] == "two_tower"
    # The new shape scores as in process (two_tower: precomputed item tower).
    status, answer = post_json(f"{url}/score", {"user_id": user, "item_ids": items})
    local = PreRankScorer(world["models"]["two_tower"][1], world["store"]).score(user, items)
    np.testing.assert_allclose(answer["scores"], local.scores, rtol=1e-5)
    assert answer["out_of_vocabulary_items"] == local.out_of_vocabulary_items


def test_a_broken_new_model_is_refused_and_the_old_one_kept(world, served):
    url, models = served["url"], served["models"]
    before = _health(url)
    staged = models / ".staging-broken"
    shutil.copytree(world["models"]["cold"][1], staged)
    meta = json.loads((staged / "model.json").read_text())
    meta["lineage"]["feature_service"] = "prerank_v1"  # a model of the retired contract
    (staged / "model.json").write_text(json.dumps(meta))
    staged.rename(models / "zz-broken")
    deadline = time.monotonic() + 60
    while _health(url)["model_reload_errors"] == before["model_reload_errors"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    health = _health(url)
    assert health["model_version"] == before["model_version"] and "retired" in health["last_error"]
    status, _ = post_json(f"{url}/score", {"user_id": "u1", "item_ids": ["i1"]})
    assert status == 200
