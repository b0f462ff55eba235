"""The Feast store end to end on the small simulator world: apply-if-changed, point-in-time training
retrieval, offline/online consistency (SQLite and Redis, embeddings and dtypes included), the online
client's handling of unknown ids, and `feast serve` over HTTP on 127.0.0.1."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import load_settings
from gpl_platform.features import parquet
from gpl_platform.features.fixtures import build_feature_world
from gpl_platform.features.schema import EMB
from gpl_platform.features.serving import _FeastReader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = load_settings({"data_dir": str(tmp_path_factory.mktemp("feast") / "data")})
    return build_feature_world(settings)


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _serving_rows(world, n_users=4, n_items=12):
    """Entities to compare: known users/items plus ids the store has never seen."""
    ds = world["dataset"]
    users = ds.events["user_id"].drop_duplicates().tolist()[:n_users] + ["ghost-user"]
    items = ds.events["item_id"].drop_duplicates().tolist()[:n_items] + ["ghost-item"]
    return users, items


def _assert_same(a: pd.DataFrame, b: pd.DataFrame):
    """Identical values and dtypes; embeddings compared element-wise with their float32 dtype."""
    assert list(a.columns) == list(b.columns)
    emb = [c for c in a.columns if len(a) and isinstance(a[c].iloc[0], np.ndarray)]
    pd.testing.assert_frame_equal(a.drop(columns=emb), b.drop(columns=emb), check_exact=True)
    for c in emb:
        for x, y in zip(a[c], b[c]):
            assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y), c


def test_apply_runs_only_when_definitions_change(world):
    store = world["store"]
    spec = store.spec()
    assert store.apply_if_changed(spec)["applied"] is False
    fs = store.store
    assert {s.name for s in fs.list_feature_services()} == {"prerank_v1", "prerank_scalar_v1"}
    assert {v.name for v in fs.list_feature_views()} == set(spec.views())
    scalar = fs.get_feature_service("prerank_scalar_v1")
    scalar_names = {f.name for p in scalar.feature_view_projections for f in p.features}
    assert not scalar_names & {"i_content_emb", "u_history_emb"} and "i_has_content_emb" in scalar_names
    # A changed spec (a source without the `country` column) is applied, then the original again.
    changed = type(spec)({k: v for k, v in spec.user_attributes.items() if k != "u_attr_country"},
                         spec.item_attributes, spec.embedding_dim)
    try:
        assert store.apply_if_changed(changed)["applied"] is True
        fs.refresh_registry()
        names = [f.name for f in fs.get_feature_view("user_profile").features]
        assert "u_attr_country" not in names
    finally:
        assert store.apply_if_changed(spec)["applied"] is True


def test_training_features_are_point_in_time_correct(world):
    store, ds = world["store"], world["dataset"]
    events = ds.events[ds.events["day"] == world["days"][2]]
    user, item, t = events.iloc[0][["user_id", "item_id", "event_time"]]
    sources = store.sources_dir
    spec = store.spec()
    # A "late" row: written one second after the event, with values no real row has.
    leak_user = pd.DataFrame({"user_id": [user], "event_timestamp": [t + timedelta(seconds=1)],
                              **{n: [999_999] if dt == "Int64" else [9.5] for n, dt in
                                 spec.views()["user_activity"]["features"].items()}})
    leak_item = pd.DataFrame({"item_id": [item], "event_timestamp": [t + timedelta(seconds=1)],
                              **{n: [888_888] if dt == "Int64" else [8.5] for n, dt in
                                 spec.views()["item_activity"]["features"].items()}})
    leak_files = [parquet.write_atomic(parquet.to_arrow(leak_user, "user_id", spec.views()["user_activity"]["features"]),
                                       sources / "user_activity" / "zz-late.parquet"),
                  parquet.write_atomic(parquet.to_arrow(leak_item, "item_id", spec.views()["item_activity"]["features"]),
                                       sources / "item_activity" / "zz-late.parquet")]
    try:
        entity_df = pd.DataFrame({"user_id": [user] * 3, "item_id": [item] * 3, "label": [0, 1, 2],
                                  "event_time": [t, t + timedelta(seconds=1) - timedelta(microseconds=1),
                                                 t + timedelta(seconds=1)]})
        out = store.historical_features(entity_df)
    finally:
        for f in leak_files:
            f.unlink()
    assert out["label"].tolist() == [0, 1, 2]  # input order and extra columns kept
    assert out.loc[:1, "u_requests"].tolist() != [999_999] * 2 and 999_999 not in out.loc[:1, "u_requests"].tolist()
    assert 888_888 not in out.loc[:1, "i_exposures"].tolist()
    assert out.loc[2, "u_requests"] == 999_999 and out.loc[2, "i_exposures"] == 888_888  # visible once written
    # ...and the value the event does get is the day's snapshot: requests strictly before its day.
    before = ds.events[(ds.events["user_id"] == user) & (ds.events["day"] < world["days"][2])]
    assert out.loc[0, "u_requests"] == before["request_id"].nunique()
    assert out.loc[0, "u_exposures"] == int(before["exposed"].sum())


def _offline_at_serving_time(world, users, items, service="prerank_v1"):
    store = world["store"]
    at = pd.Timestamp(world["days"][-1].isoformat(), tz="UTC") + timedelta(hours=23)
    entity_df = pd.DataFrame([(u, i, at) for u in users for i in items], columns=["user_id", "item_id", "event_time"])
    return store.historical_features(entity_df, service=service), store.historical_features(
        entity_df, service=service, fill_defaults=False)


@pytest.mark.parametrize("service", ["prerank_v1", "prerank_scalar_v1"])
def test_offline_and_online_features_are_identical(world, service):
    store = world["store"]
    users, items = _serving_rows(world)
    offline, offline_raw = _offline_at_serving_time(world, users, items, service)
    for reader in ("sqlite", "feast"):
        client = store.online_client(service=service, reader=reader)
        for user in users:
            got = client.get(user, items)
            want = offline[offline["user_id"] == user].drop(columns="event_time").reset_index(drop=True)
            _assert_same(got.frame, want)
    # Raw values (before defaults) agree too: the Feast online answer vs the point-in-time join.
    types = store.spec().feature_types()
    reader = _FeastReader(store.store, store.online_client(service=service, reader="feast").layout)
    online_items = reader.read("item", items)
    raw = offline_raw[offline_raw["user_id"] == users[0]].reset_index(drop=True)
    for name, values in online_items.items():
        for k, (on, off) in enumerate(zip(values, raw[name])):
            if on is None:
                assert items[k] == "ghost-item" and (off is None or pd.isna(off) if not isinstance(off, (list, np.ndarray))
                                                      else False)
            elif types[name] == EMB:
                assert np.asarray(off).dtype == np.float32 and np.array_equal(on, np.asarray(off)), name
            else:
                assert on == off and type(on)(off) == on, name


def test_online_client_defaults_and_flags_unknown_ids(world):
    client = world["store"].online_client()
    users, items = _serving_rows(world)
    got = client.get("ghost-user", [items[0], "ghost-item", items[0], "ghost-item"])
    assert got.unknown_user and got.unknown_items == ["ghost-item"]
    assert got.matrix.dtype == np.float32 and got.matrix.shape == (4, len(got.columns))
    frame = got.frame
    assert frame["i_known"].tolist() == [1, 0, 1, 0] and (frame["u_known"] == 0).all()
    assert (frame["u_days_since_last_request"] == -1).all() and frame.loc[1, "i_long_tail"] == 1
    assert not frame.loc[1, "i_content_emb"].any() and frame.loc[0, "i_content_emb"].any()
    np.testing.assert_array_equal(got.matrix[0], got.matrix[2])
    col = got.columns.index("i_known")
    assert got.matrix[:, col].tolist() == [1, 0, 1, 0]
    known = client.get(users[0], items[:3])
    assert not known.unknown_user and known.unknown_items == []
    assert client.get(users[0], []).matrix.shape[0] == 0


def test_redis_online_store_serves_the_same_features(world, redis_url):
    from gpl_platform.features.store import FeastStore

    redis_store = FeastStore(world["store"].settings, redis_url=redis_url)
    assert redis_store.apply_if_changed(redis_store.spec())["applied"] is True
    redis_store.materialize_days(world["days"])
    assert redis_store.config["online_store"]["type"] == "redis"
    users, items = _serving_rows(world)
    sqlite_client, redis_client = world["store"].online_client(), redis_store.online_client()
    assert redis_client.reader_name == "feast"
    for user in users:
        a, b = sqlite_client.get(user, items), redis_client.get(user, items)
        assert a.columns == b.columns and np.array_equal(a.matrix, b.matrix)
        _assert_same(a.frame, b.frame)
    # Re-materializing a day is idempotent.
    redis_store.materialize_days(world["days"][-1:])
    assert np.array_equal(redis_client.get(users[0], items).matrix, sqlite_client.get(users[0], items).matrix)


def test_feast_serve_answers_over_http_on_localhost(world):
    store = world["store"]
    repo = store.write_repo()
    port = _free_port()
    feast = str(Path(sys.executable).parent / "feast")
    proc = subprocess.Popen([feast, "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    users, items = _serving_rows(world, n_users=1, n_items=3)
    body = json.dumps({"feature_service": "prerank_scalar_v1",
                       "entities": {"user_id": [users[0]] * 3, "item_id": items[:3]}}).encode()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"feast serve exited: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    names = answer["metadata"]["feature_names"]
    values = dict(zip(names, (r["values"] for r in answer["results"])))
    frame = store.online_client(service="prerank_scalar_v1").get(users[0], items[:3]).frame
    assert values["i_exposures"] == frame["i_exposures"].tolist()
    assert values["u_requests"] == frame["u_requests"].tolist()


def test_feast_calls_leave_no_duckdb_connection_open(world):
    """Feast's offline store opens ibis's default DuckDB backend and never closes it; left open to the
    interpreter's exit it prints `nanobind: leaked ...` lines. The store closes it after each call."""
    import ibis

    store, ds = world["store"], world["dataset"]
    rows = ds.events.head(5)[["user_id", "item_id", "event_time"]]
    assert ibis.options.default_backend is None
    out = store.historical_features(rows)
    assert len(out) == 5
    assert ibis.options.default_backend is None
    store.materialize_days(world["days"][:1])
    assert ibis.options.default_backend is None
