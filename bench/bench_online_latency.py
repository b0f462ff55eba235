"""Online feature retrieval latency: one user plus N candidate items, per online store (SQLite, Redis) and
per path, against a direct read of the same rows from the same store (the floor), in one run.

    gpl bench online-latency --items 100 --items 1000 --out reports/online_latency.json

Builds a simulator world (>= N items, random unit item embeddings, no model load) in a temp data
dir, materializes it into SQLite and (when ``redis-server`` is installed) into a Redis started
on 127.0.0.1 for the run, starts the platform's Feast feature server (``feast serve``'s app,
``python -m gpl_platform.features serve``) on each store, then times per store and item count:

* ``<store>``: ``OnlineFeatureClient.get(user, items)``: the ``prerank_v2`` inputs through Feast's
  ``get_online_features``, on-demand views included, decoded into the float32 matrix (two calls:
  the user-only views with one row, the rest with one row per item)
* ``<store>_service``: one ``get_online_features(features=<prerank_v2>)`` call, 1 user x N items
  (what ``feast serve`` runs), not decoded
* ``<store>_http``: that request as ``POST /get-online-features`` to the feature server (keep-alive
  connection, JSON answer parsed); ``<store>_http_batched``: the client's two requests over HTTP (the
  user-only features with one row, the rest per item)
* ``<store>_stored``: the stored features of the user and the items with the derived inputs
  computed in process (what the scoring service does when it does not keep the item side)
* ``floor_<store>``: fetching the same rows' bytes only (SQL ``IN`` query per view / one pipelined
  ``HGETALL`` per entity), no decoding

The JSON has one block per item count (``sizes``), each with its load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _support import RunningServer, build_feature_world, free_port  # noqa: E402
from _timing import random_requests, write_json  # noqa: E402
from _timing import time_calls as _time  # noqa: E402

from gpl_platform.data.sql import quote_identifier  # noqa: E402


def _start_redis():
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, f"127.0.0.1:{port}"
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                return None, None
            time.sleep(0.05)


def _entity_keys(entity: str, ids):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from gpl_platform.features.schema import ENTITY_KEYS

    return [EntityKey(join_keys=[ENTITY_KEYS[entity]], entity_values=[Value(string_val=i)]) for i in ids]


def _sqlite_floor(store, views_of):
    con = sqlite3.connect(f"file:{store.config['online_store']['path']}?mode=ro", uri=True)
    from feast.infra.key_encoding_utils import serialize_entity_key

    project = store.config["project"]

    @cache  # key bytes cached, as the client does: the floor is the store read alone
    def key(entity, i):
        return serialize_entity_key(_entity_keys(entity, [i])[0], entity_key_serialization_version=3)

    def read(user, items):
        for entity, ids in (("user", [user]), ("item", items)):
            keys = [key(entity, i) for i in ids]
            for view in views_of[entity]:
                con.execute(
                    f"SELECT entity_key, feature_name, value FROM {quote_identifier(f'{project}_{view}')} "
                    f"WHERE entity_key IN ({','.join('?' * len(keys))})",
                    keys,
                ).fetchall()

    return read


def _redis_floor(redis_url: str, project: str):
    import redis
    from feast.infra.online_stores.helpers import _redis_key

    host, port = redis_url.split(":")
    client = redis.Redis(host=host, port=int(port))

    @cache
    def key(entity, i):
        return _redis_key(project, _entity_keys(entity, [i])[0], entity_key_serialization_version=3)

    def read(user, items):
        pipe = client.pipeline(transaction=False)
        for entity, ids in (("user", [user]), ("item", items)):
            for i in ids:
                pipe.hgetall(key(entity, i))
        pipe.execute()

    return read


def _http_client(url: str, user_refs: list[str] | None = None, pair_refs: list[str] | None = None):
    """POST /get-online-features for (user, items) on one keep-alive connection: the whole service in one
    request, or (given the client's references) the user-only features with one row, then the rest."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def post(request: dict) -> dict:
        body = json.dumps(request)
        try:
            connection.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # the server closes a connection idle past its keep-alive timeout (between two item counts):
            # reconnect once; it happens on an untimed warm-up call
            connection.close()
            connection.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"feature server answered {answer.status}: {data[:500]!r}")
        return json.loads(data)

    def one_request(user, items):
        post({"feature_service": "prerank_v2", "entities": {"user_id": [user] * len(items), "item_id": items}})

    def batched(user, items):
        post({"features": user_refs, "entities": {"user_id": [user]}})
        post({"features": pair_refs, "entities": {"user_id": [user] * len(items), "item_id": items}})

    return one_request if user_refs is None else batched


def _feature_server(store):
    """The platform's feature server (Feast's app) on ``store``'s settings, in a subprocess."""
    cfg = store.settings.feature_store
    port = free_port()
    env = {
        "GPL_DATA_DIR": str(store.settings.data_dir),
        "GPL_FEATURE_STORE__ONLINE_STORE": cfg.online_store,
        "GPL_FEATURE_STORE__REDIS": cfg.redis,
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "gpl_platform.features", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return RunningServer(command, f"{url}/health", env=env), url


def _paths(store, views_of, redis_url, http_url) -> dict:
    """``{path name: fn(user, items)}`` of one store."""
    from gpl_platform.prerank.serving import InputReader

    name = store.online_store_type
    client = store.online_client()
    reader = InputReader(store, "prerank_v2")
    service = store.feature_service("prerank_v2")
    fs = store.store
    return {
        name: client.get,
        f"{name}_service": lambda u, items: fs.get_online_features(
            features=service, entity_rows={"user_id": [u] * len(items), "item_id": items}
        ),
        f"{name}_http": _http_client(http_url),
        f"{name}_http_batched": _http_client(http_url, client.user_refs, client.pair_refs),
        f"{name}_stored": lambda u, items: (reader.inputs("user", [u]), reader.inputs("item", items)),
        f"floor_{name}": _sqlite_floor(store, views_of)
        if name == "sqlite"
        else _redis_floor(redis_url, store.config["project"]),
    }


def run(
    n_items: int | Sequence[int] = (100, 1000),
    out: str | Path | None = None,
    n_requests: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict:
    """Measure every path of every store for each item count in ``n_items``; returns
    ``{"sizes": {"100": {"sqlite": {p50_ms, p99_ms, ...}, "sqlite_http": ..., "floor_sqlite": ...,
    "loadavg_before": [...], ...}, ...}, ...}`` and writes it as JSON to ``out`` when given."""
    from gpl_platform.config import load_settings
    from gpl_platform.features.store import FeastStore

    sizes = [n_items] if isinstance(n_items, int) else list(n_items)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="gpl-bench-online-")
        data_dir = Path(tmp) / "data"
    settings = load_settings(
        {
            "source": "simulator",
            "data_dir": str(data_dir),
            "seed": seed,
            "simulator": {"n_items": max(2000, *sizes), "n_users": 300, "n_days": 3},
        }
    )
    redis_proc, redis_url = _start_redis()
    results: dict = {"loadavg_before": [round(x, 2) for x in os.getloadavg()], "sizes": {}}
    servers = []
    try:
        t0 = time.perf_counter()
        world = build_feature_world(settings)
        results["world_build_s"] = round(time.perf_counter() - t0, 1)
        stores = [world["store"]]
        if redis_url:
            redis_settings = settings.model_copy(
                update={
                    "feature_store": settings.feature_store.model_copy(
                        update={"online_store": "redis", "redis": redis_url}
                    )
                }
            )
            stores.append(FeastStore(redis_settings))
            stores[-1].apply_if_changed(world["store"].spec())
            stores[-1].materialize_days(world["days"])
        views_of = {
            e: [v for v, i in world["store"].spec().views().items() if i["entity"] == e] for e in ("user", "item")
        }
        paths = {}
        for store in stores:
            server, url = _feature_server(store)
            servers.append(server)
            paths |= _paths(store, views_of, redis_url, url)
        # as a serving process does once it is set up (the feature server does): a full collection over the
        # startup objects would otherwise land in the timed calls (~200 ms every ~150 requests of 100 items)
        gc.freeze()
        results["gc_frozen"] = True
        for n in sizes:
            count = n_requests or (300 if n <= 200 else 100)
            requests = random_requests(world["dataset"], n, count, seed)
            block: dict = {"n_requests": count, "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
            for name, fn in paths.items():
                block[name] = _time(fn, requests)
            block["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            block["ratio_to_floor"] = {
                name: round(block[name]["p50_ms"] / block[f"floor_{name.split('_')[0]}"]["p50_ms"], 2)
                for name in paths
                if not name.startswith("floor_")
            }
            results["sizes"][str(n)] = block
        results["n_features"] = len(stores[0].online_client().columns)
        results["redis_available"] = bool(redis_url)
        results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for server in servers:
            server.stop()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json(results, out)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--items", type=int, action="append", help="candidate items per request (repeatable; default 100 and 1000)"
    )
    parser.add_argument("--out", default=None, help="JSON output file")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per store")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process's libraries: no model hub (`gpl` sets it too)
    results = run(args.items or (100, 1000), args.out, args.requests)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
