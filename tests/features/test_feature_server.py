"""Malformed entity requests to the platform's HTTP feature server (`python -m gpl_platform.features serve`, a
real server process over the small simulator world): each is a 4xx that says what is wrong, never a 500.
Plain `feast serve` answered entity lists of different lengths, a missing or empty join key, a null id, no
features and a reference without a view with 500; well-formed requests are served as before."""

import json
import sys

import pytest

from gpl_platform.config import load_settings
from tests.helpers import RunningServer, build_feature_world, free_port, post_json

SERVICE = "prerank_scalar_v2"


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory):
    settings = load_settings({"data_dir": str(tmp_path_factory.mktemp("feature-server") / "data")})
    world = build_feature_world(settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpl_platform.features", "serve", "--port", str(port)]
    with RunningServer(command, f"{url}/health", env={"GPL_DATA_DIR": str(settings.data_dir)}) as server:
        users = world["dataset"].events["user_id"].drop_duplicates().tolist()[:2]
        items = world["dataset"].events["item_id"].drop_duplicates().tolist()[:2]
        yield f"{url}/get-online-features", users, items, server


def _ask(url: str, entities, **request) -> tuple[int, dict]:
    return post_json(url, {"feature_service": SERVICE, "entities": entities} | request)


def test_entity_lists_of_different_lengths_are_refused_with_their_lengths(feature_server):
    url, users, items, _ = feature_server
    status, answer = _ask(url, {"user_id": users[:1], "item_id": items})
    assert status == 422, answer
    assert answer["lengths"] == {"user_id": 1, "item_id": 2}
    assert "different lengths" in answer["detail"] and "user_id has 1" in answer["detail"]
    status, answer = post_json(
        url, {"features": ["user_activity:user_clicks"], "entities": {"user_id": users, "item_id": items[:1]}}
    )
    assert status == 422 and answer["lengths"] == {"user_id": 2, "item_id": 1}, answer


@pytest.mark.parametrize(
    "request_body, expected",
    [
        ({"feature_service": SERVICE, "entities": {"user_id": ["u"], "item_id": ["i"], "userid": ["u"]}}, "userid"),
        ({"feature_service": SERVICE, "entities": {"user_id": ["u"]}}, "missing entity key(s) ['item_id']"),
        ({"features": ["user_activity:user_clicks"], "entities": {"item_id": ["i"]}}, "['user_id']"),
        ({"feature_service": SERVICE, "entities": {"user_id": [], "item_id": []}}, "entity lists are empty"),
        ({"feature_service": SERVICE, "entities": {}}, "entities is empty"),
        ({"feature_service": SERVICE, "entities": {"user_id": [None], "item_id": ["i"]}}, "user_id[0] is null"),
        ({"feature_service": SERVICE, "entities": {"user_id": ["u", ["u"]], "item_id": ["i", "j"]}}, "user_id[1]"),
        ({"feature_service": SERVICE, "entities": {"user_id": ["u"], "item_id": [{"id": "i"}]}}, "a JSON object"),
        ({"feature_service": SERVICE, "entities": {"user_id": [float("nan")], "item_id": ["i"]}}, "finite"),
        ({"entities": {"user_id": ["u"], "item_id": ["i"]}}, "no features asked for"),
        ({"features": ["user_clicks"], "entities": {"user_id": ["u"]}}, "'view:feature'"),
    ],
)
def test_malformed_entities_and_features_are_422_with_the_reason(feature_server, request_body, expected):
    url = feature_server[0]
    status, answer = post_json(url, json.dumps(request_body).encode())  # json.dumps writes NaN as Feast reads it
    assert status == 422, answer
    assert expected in answer["detail"], answer


@pytest.mark.parametrize(
    "body, field",
    [
        (b"not json", "json_invalid"),
        (b'{"feature_service": "prerank_scalar_v2"}', "entities"),  # missing
        (b'{"feature_service": "prerank_scalar_v2", "entities": {"user_id": "u", "item_id": "i"}}', "user_id"),
        (b'{"feature_service": "prerank_scalar_v2", "entities": ["u"]}', "entities"),
        (b'["prerank_scalar_v2"]', "body"),
    ],
)
def test_bodies_of_the_wrong_shape_get_fastapis_422(feature_server, body, field):
    status, answer = post_json(feature_server[0], body)
    assert status == 422, answer
    assert field in json.dumps(answer["detail"]), answer


def test_well_formed_requests_are_served_and_unknown_names_stay_404(feature_server):
    url, users, items, server = feature_server
    status, answer = _ask(url, {"user_id": [users[0], users[0]], "item_id": items})
    assert status == 200, answer
    assert answer["metadata"]["feature_names"][:2] == ["user_id", "item_id"]
    assert answer["results"][1]["values"] == items
    status, answer = post_json(url, {"features": ["user_activity:user_clicks"], "entities": {"user_id": users}})
    assert status == 200 and answer["results"][0]["values"] == users, answer
    status, _ = _ask(url, {"user_id": users, "item_id": items}, feature_service="no_such_service")
    assert status == 404
    assert server.proc.poll() is None
