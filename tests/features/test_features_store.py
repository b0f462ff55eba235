"""The Feast store end to end on the small simulator world: the repository applies as literal objects,
apply-if-changed, point-in-time training retrieval, and one feature contract for every consumer:
`get_historical_features` (training), the Python online client and `feast serve` over HTTP give the
same model inputs for the same entities at the same feature time, on SQLite and on Redis, known and
unknown ids included."""

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpl_platform.config import PROJECT_ROOT, load_settings
from gpl_platform.data.sources import load_source
from gpl_platform.features import derived, parquet, pipeline
from gpl_platform.features.schema import EMB, EMBEDDING_DIM, USER_ITEM_COSINE, default_value, stored_type
from gpl_platform.features.store import FeastStore, ibis_default_backend_closed
from tests.helpers import RunningServer, build_feature_world, free_port, post_json

SERVICES = ("prerank_v2", "prerank_scalar_v2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # the online store written 7 entities at a time: every agreement test below reads batched writes
    settings = load_settings(
        {"data_dir": str(tmp_path_factory.mktemp("feast") / "data"), "feature_store": {"materialize_batch_rows": 7}}
    )
    return build_feature_world(settings)


@pytest.fixture(scope="module")
def redis_store(world, redis_url):
    """The same sources in the Redis online store (the settings say so: feature_store.online_store)."""
    settings = world["store"].settings.model_copy(
        update={
            "feature_store": world["store"].settings.feature_store.model_copy(
                update={"online_store": "redis", "redis": redis_url}
            )
        }
    )
    store = FeastStore(settings)
    assert store.apply_if_changed(world["store"].spec())["applied"] is True
    store.materialize_days(world["days"])
    return store


def _serving_rows(world, n_users=3, n_items=8):
    """Entities to compare: known users/items plus ids the store has never seen."""
    ds = world["dataset"]
    users = ds.events["user_id"].drop_duplicates().tolist()[:n_users] + ["ghost-user"]
    items = ds.events["item_id"].drop_duplicates().tolist()[:n_items] + ["ghost-item"]
    return users, items


def _serving_time(world):
    return pd.Timestamp(world["days"][-1].isoformat(), tz="UTC") + timedelta(hours=23)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame):
    """Identical values and dtypes; embeddings compared element-wise with their float32 dtype."""
    assert list(a.columns) == list(b.columns)
    emb = [c for c in a.columns if len(a) and isinstance(a[c].iloc[0], np.ndarray)]
    pd.testing.assert_frame_equal(
        a.drop(columns=emb).reset_index(drop=True), b.drop(columns=emb).reset_index(drop=True), check_exact=True
    )
    for c in emb:
        for x, y in zip(a[c], b[c]):
            assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y), c


def test_repository_objects_are_registered_and_apply_runs_only_when_they_change(world):
    store = world["store"]
    spec = store.spec()
    assert store.apply_if_changed(spec)["applied"] is False
    fs = store.store
    assert {s.name for s in fs.list_feature_services()} == set(SERVICES)
    assert {v.name for v in fs.list_feature_views()} == set(spec.views())
    assert {v.name for v in fs.list_on_demand_feature_views()} == {
        "user_inputs",
        "item_inputs",
        "known_ids",
        "user_item_inputs",
    }
    scalar = {n for n, _ in store.service_features("prerank_scalar_v2")}
    assert not scalar & {"i_content_emb", "u_history_emb", "ui_cosine"} and {"i_has_content_emb", "u_known"} <= scalar
    full = store.service_features("prerank_v2")
    assert [n for n, _ in full][-3:] == ["u_known", "i_known", "ui_cosine"]
    assert ("u_num_age", "Float64") in full and ("u_cat_country", "String") in full  # the generated attributes
    with pytest.raises(ValueError, match="retired.*prerank_v2"):
        store.service_features("prerank_v1")
    # A changed spec (a source without the `country` column) is applied, then the original again.
    changed = type(spec)(
        {k: v for k, v in spec.user_attributes.items() if k != "user_cat_country"}, spec.item_attributes
    )
    try:
        assert store.apply_if_changed(changed)["applied"] is True
        fs.refresh_registry()
        assert "user_cat_country" not in [f.name for f in fs.get_feature_view("user_profile").features]
        assert "u_cat_country" not in [f.name for f in fs.get_on_demand_feature_view("user_inputs").features]
    finally:
        assert store.apply_if_changed(spec)["applied"] is True


def test_feast_plan_and_apply_work_on_the_repository_folder_of_a_fresh_clone(tmp_path):
    """`feast -c feature_repo plan|apply` with nothing generated yet: no data, no attribute file."""
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "feature_repo"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    files = tracked.stdout.split() or [
        str(p.relative_to(PROJECT_ROOT))
        for p in (PROJECT_ROOT / "feature_repo").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.parent.name != "data"
    ]
    for name in files:  # what a clone has: the tracked files only
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, clone / name)
    feast = str(Path(sys.executable).parent / "feast")
    env = {"GPL_DATA_DIR": str(clone / "data"), "PATH": str(Path(sys.executable).parent)}
    for command in ("plan", "apply"):
        done = subprocess.run(
            [feast, "-c", str(clone / "feature_repo"), command],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, **env},
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prerank_v2" in done.stdout and "user_item_inputs" in done.stdout
    assert (clone / "feature_repo" / "data" / "registry.db").exists()  # as the committed feature_store.yaml says


def test_training_features_are_point_in_time_correct(world):
    store, ds = world["store"], world["dataset"]
    events = ds.events[ds.events["day"] == world["days"][2]]
    user, item, t = events.iloc[0][["user_id", "item_id", "event_time"]]
    views = store.spec().views()
    # A "late" row: written one second after the event, with values no real row has.
    late = {"user_activity": ("user_id", user, 999_999), "item_activity": ("item_id", item, 888_888)}
    leak_files = []
    for view, (key, entity, marker) in late.items():
        features = views[view]["features"]
        frame = pd.DataFrame(
            {
                key: [entity],
                "event_timestamp": [t + timedelta(seconds=1)],
                **{n: [marker] if dt == "Int64" else [marker + 0.5] for n, dt in features.items()},
            }
        )
        leak_files.append(
            parquet.write_atomic(parquet.to_arrow(frame, key, features), store.sources_dir / view / "zz-late.parquet")
        )
    try:
        entity_df = pd.DataFrame(
            {
                "user_id": [user] * 3,
                "item_id": [item] * 3,
                "label": [0, 1, 2],
                "event_time": [t, t + timedelta(seconds=1) - timedelta(microseconds=1), t + timedelta(seconds=1)],
            }
        )
        out = store.historical_features(entity_df)
    finally:
        for f in leak_files:
            f.unlink()
    assert out["label"].tolist() == [0, 1, 2]  # input order and extra columns kept
    assert 999_999 not in out.loc[:1, "u_requests"].tolist() and 888_888 not in out.loc[:1, "i_exposures"].tolist()
    assert out.loc[2, "u_requests"] == 999_999 and out.loc[2, "i_exposures"] == 888_888  # visible once written
    # ...and the value the event does get is the day's snapshot: requests strictly before its day.
    before = ds.events[(ds.events["user_id"] == user) & (ds.events["day"] < world["days"][2])]
    assert out.loc[0, "u_requests"] == before["request_id"].nunique()
    assert out.loc[0, "u_exposures"] == int(before["exposed"].sum())


def _http_frame(answer: dict, users, items, features) -> pd.DataFrame:
    """The `feast serve` answer as the typed frame the Python client gives."""
    values = dict(zip(answer["metadata"]["feature_names"], (r["values"] for r in answer["results"])))
    statuses = {n: r["statuses"] for n, r in zip(answer["metadata"]["feature_names"], answer["results"])}
    data = {"user_id": users, "item_id": items}
    for name, dtype in features:
        assert set(statuses[name]) == {"PRESENT"}, (name, statuses[name])  # defaults, never nulls
        col = values[name]
        if dtype == EMB:
            col = pd.Series([np.asarray(v, dtype=np.float32) for v in col], dtype=object)
        elif dtype == "Int64":
            col = np.asarray(col, dtype=np.int64)
        elif dtype == "Float64":
            col = np.asarray(col, dtype=np.float64)
        else:
            col = np.asarray(col, dtype=object)
        data[name] = col
    return pd.DataFrame(data)


def _three_paths_agree(store, world, feast_serve_url):
    users, items = _serving_rows(world)
    at = _serving_time(world)
    for service in SERVICES:
        features = store.service_features(service)
        entity_df = pd.DataFrame(
            [(u, i, at) for u in users for i in items], columns=["user_id", "item_id", "event_time"]
        )
        offline = store.historical_features(entity_df, service=service).drop(columns="event_time")
        client = store.online_client(service)
        for user in users:
            want = offline[offline["user_id"] == user].reset_index(drop=True)
            got = client.get(user, items)
            _assert_same(got.frame, want)
            assert got.unknown_user == (user == "ghost-user") and got.unknown_items == ["ghost-item"]
            status, answer = post_json(
                f"{feast_serve_url}/get-online-features",
                {"feature_service": service, "entities": {"user_id": [user] * len(items), "item_id": items}},
            )
            assert status == 200, answer
            _assert_same(_http_frame(answer, [user] * len(items), items, features), want)
    # The contract's defaults for unknown ids, as every consumer sees them.
    ghost = offline[offline["user_id"] == "ghost-user"]
    assert (ghost["u_known"] == 0).all() and (ghost["u_days_since_last_request"] == -1).all()
    assert (ghost["u_cat_country"] == "").all() and (ghost["u_num_age"] == 0.0).all()
    row = offline[offline["item_id"] == "ghost-item"].iloc[0]
    assert row["i_known"] == 0 and row["i_long_tail"] == 1 and row["i_exposures"] == 0


def _feast_serve(store, env):
    port = free_port()
    return RunningServer(
        [sys.executable, "-m", "gpl_platform.features", "serve", "--port", str(port)],
        f"http://127.0.0.1:{port}/health",
        env=env,
    ), f"http://127.0.0.1:{port}"


def test_training_python_and_http_give_the_same_inputs_on_sqlite(world):
    store = world["store"]
    server, url = _feast_serve(store, {"GPL_DATA_DIR": str(store.settings.data_dir)})
    with server:
        _three_paths_agree(store, world, url)


def test_training_python_and_http_give_the_same_inputs_on_redis(world, redis_store, redis_url):
    assert redis_store.online_store_type == "redis"
    server, url = _feast_serve(
        redis_store,
        {
            "GPL_DATA_DIR": str(redis_store.settings.data_dir),
            "GPL_FEATURE_STORE__ONLINE_STORE": "redis",
            "GPL_FEATURE_STORE__REDIS": redis_url,
        },
    )
    with server:
        _three_paths_agree(redis_store, world, url)
    # ...and Redis serves exactly what SQLite serves.
    users, items = _serving_rows(world)
    a, b = world["store"].online_client().get(users[0], items), redis_store.online_client().get(users[0], items)
    assert a.columns == b.columns and np.array_equal(a.matrix, b.matrix)
    redis_store.materialize_days(world["days"][-1:])  # re-materializing a day is idempotent
    assert np.array_equal(redis_store.online_client().get(users[0], items).matrix, a.matrix)


def test_online_client_matrix_and_flags(world):
    client = world["store"].online_client()
    users, items = _serving_rows(world)
    got = client.get("ghost-user", [items[0], "ghost-item", items[0], "ghost-item"])
    assert got.unknown_user and got.unknown_items == ["ghost-item"]
    # 2 x 384 embedding dimensions and the scalars of the simulator's observable attributes (no ground truth)
    assert got.matrix.dtype == np.float32 and got.matrix.shape == (4, len(got.columns)) == (4, 793)
    np.testing.assert_array_equal(got.matrix[0], got.matrix[2])
    assert got.matrix[:, got.columns.index("i_known")].tolist() == [1, 0, 1, 0]
    assert not got.frame.loc[1, "i_content_emb"].any() and got.frame.loc[0, "i_content_emb"].any()
    assert client.get(users[0], []).matrix.shape == (0, 793)


def test_sql_registry_is_a_setting(world, tmp_path):
    """The registry in a SQL database (SQLAlchemy URL) instead of a file: same objects, same answers."""
    base = world["store"].settings
    settings = base.model_copy(
        update={
            "feature_store": base.feature_store.model_copy(
                update={"registry": "sql", "registry_url": f"sqlite:///{tmp_path / 'registry.sqlite'}"}
            )
        }
    )
    store = FeastStore(settings)
    assert store.config["registry"]["registry_type"] == "sql"
    assert store.apply_if_changed(world["store"].spec())["applied"] is True
    assert store.apply_if_changed(world["store"].spec())["applied"] is False
    store.materialize_days(world["days"])
    users, items = _serving_rows(world)
    assert np.array_equal(
        store.online_client().get(users[0], items).matrix, world["store"].online_client().get(users[0], items).matrix
    )
    assert json.loads(json.dumps(store.materialization_key(["item_activity"])))  # intervals recorded in SQL


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


def test_materialization_is_bounded_by_settings_and_writes_every_entity(world):
    """Feast keeps the latest row per entity in DuckDB (pull_latest_features), under the warehouse's DuckDB
    cap, and writes the online store ``materialize_batch_rows`` entities at a time; with 7 a time every user
    of the world still reads its newest values online."""
    import ibis

    store = world["store"]
    assert store.config["materialization"] == {"pull_latest_features": True, "online_write_batch_size": 7}
    files = parquet.view_dir(store.sources_dir, "user_activity").glob("*.parquet")
    offline = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    newest = offline.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    users = sorted(newest.index)
    assert len(users) > 3 * 7 and len(offline) > len(users)  # several days per user: the newest must win
    online = store.store.get_online_features(
        features=["user_activity:user_requests", "user_activity:user_active_days"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    for name in ("user_requests", "user_active_days"):
        assert online[name] == [int(newest.loc[u, name]) for u in users], name
    with ibis_default_backend_closed("300MB"):
        (limit,) = ibis.options.default_backend.raw_sql("SELECT current_setting('memory_limit')").fetchone()
    assert limit.startswith("286.1") and ibis.options.default_backend is None  # 300 MB in MiB, then closed


def test_the_documented_contract_table_is_the_registered_one(world):
    """docs/FEATURES.md lists every input of prerank_v2 (attribute columns as their patterns)."""
    import re

    text = (PROJECT_ROOT / "docs" / "FEATURES.md").read_text()
    section = text.split("## The feature contract", 1)[1].split("\n## ", 1)[0]
    documented = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([a-z0-9_<>]+)` \| [^|]+\| ([A-Za-z0-9()]+)", section, re.MULTILINE)
    }
    registered = {
        re.sub(r"^([ui])_(num|cat)_.*", r"\1_\2_<column>", n): t
        for n, t in world["store"].service_features("prerank_v2")
    }
    assert documented == registered
    # ... and each documented default is the value the schema gives a missing stored feature (for
    # ui_cosine: what the on-demand function returns when both embeddings are missing)
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    assert {row[0].strip("`") for row in rows} == set(registered)
    for name, _, dtype_cell, default_cell, *_ in rows:
        name = name.strip("`")
        if name == USER_ITEM_COSINE:
            expected = derived.user_item_cosine({"user_history_emb": [None], "item_content_emb": [None]})[name][0]
        else:
            stored = ("user_" if name.startswith("u_") else "item_") + name[2:].replace("<column>", "x")
            expected = default_value(stored, stored_type(stored))
        documented_default = default_cell.split(" (")[0]
        if documented_default == "zeros":
            assert dtype_cell == f"{EMB}, {EMBEDDING_DIM}", name
            assert isinstance(expected, np.ndarray) and expected.shape == (EMBEDDING_DIM,) and not expected.any(), name
        elif documented_default == '`""`':
            assert expected == "", name
        else:  # a number: the same value and the same kind (0 for Int64, 0.0 for Float64)
            kind = (float,) if "." in documented_default else (int, np.integer)
            assert isinstance(expected, kind) and expected == float(documented_default), (
                name,
                documented_default,
                expected,
            )


def test_the_online_client_reads_the_user_once_and_agrees_with_the_one_call_service(world):
    """The client's two reads (user-only views with one row, the rest per candidate) give what one
    `get_online_features` of the whole service gives (what `feast serve` answers)."""
    store = world["store"]
    client = store.online_client()
    assert any(ref.startswith("user_inputs:") for ref in client.user_refs)
    assert not any(ref.startswith(("item_inputs:", "known_ids:", "user_item_inputs:")) for ref in client.user_refs)
    users, items = _serving_rows(world)
    for user in (users[0], "ghost-user"):
        one_call = store.store.get_online_features(
            features=store.feature_service(), entity_rows={"user_id": [user] * len(items), "item_id": items}
        ).to_dict()
        got = client.get(user, items).frame
        for name, dtype in store.service_features():
            want = one_call[name]
            if dtype == EMB:
                assert all(np.array_equal(x, np.asarray(y, np.float32)) for x, y in zip(got[name], want)), name
            else:
                assert got[name].tolist() == want, name


def test_a_request_never_mixes_rows_of_two_materializations(tmp_path):
    """A new day's materialization landing between the client's two reads: the request is read again,
    so every input comes from the new materialization (none from the day before)."""
    settings = load_settings({"data_dir": str(tmp_path / "data")})
    days = sorted(set(load_source(settings).events["day"]))
    world = build_feature_world(settings, days=days[:-1])
    store, warehouse = world["store"], world["warehouse"]
    users, items = _serving_rows(world)
    client = store.online_client()
    before = client.get(users[0], items)
    pipeline.write_user_features(settings, warehouse, days[-1:], days[0])
    pipeline.write_item_features(settings, warehouse, days[-1:], days[0])
    feast_read = store.store.get_online_features
    landed = []

    def read_then_materialize(*args, **kwargs):  # the new day lands right after the client's first read
        answer = feast_read(*args, **kwargs)
        if not landed:
            landed.append(store.materialize_days(days[-1:]))
        return answer

    store.store.get_online_features = read_then_materialize
    try:
        got = client.get(users[0], items)
    finally:
        del store.store.get_online_features
    assert landed
    after = client.get(users[0], items)
    assert not np.array_equal(before.matrix, after.matrix)  # the new day changed the inputs...
    user_columns = [k for k, c in enumerate(after.columns) if c.startswith("u_")]
    assert not np.array_equal(before.matrix[:, user_columns], after.matrix[:, user_columns])  # ...the user's too
    np.testing.assert_array_equal(got.matrix, after.matrix)  # ...and the request read the new day only


def test_the_training_matrix_read_in_chunks_is_the_matrix_read_at_once(world):
    from gpl_platform.prerank.data import attach_features, load_candidates

    cands = load_candidates(world["warehouse"], world["days"]).head(300)
    whole, columns = attach_features(world["store"], cands, "prerank_v2", chunk_rows=10_000)
    chunked, chunked_columns = attach_features(world["store"], cands, "prerank_v2", chunk_rows=7)  # 43 chunks
    assert chunked_columns == columns and whole.shape == (300, len(columns))
    np.testing.assert_array_equal(chunked, whole)  # same rows, same order
    assert not np.array_equal(whole[:150], whole[150:])  # the rows differ, so a shifted chunk would show
    empty, _ = attach_features(world["store"], cands.head(0), "prerank_v2", chunk_rows=7)
    assert empty.shape == (0, len(columns))
