"""Online feature retrieval latency: one user plus N candidate items, SQLite and Redis online stores,
against a direct read of the same rows from the same store (the floor), in one run.

    python bench/bench_online_latency.py --items 100 --out reports/online_latency_100.json

Builds a simulator world (>= N items, random unit item embeddings, no model load) in a temp data
dir, materializes it into SQLite and (when ``redis-server`` is installed) into a Redis started
on 127.0.0.1 for the run, then times ``OnlineFeatureClient.get(user, items)`` (features of the
``prerank_v1`` service, decoded into the float32 matrix) per store. Entries:

* ``sqlite``: the client on the SQLite store (its default direct reader of Feast's tables)
* ``sqlite_feast_sdk``: the same client through ``FeatureStore.get_online_features``
* ``redis``: the client on the Redis store (through ``get_online_features``)
* ``floor_sqlite`` / ``floor_redis``: fetching the same rows' bytes only (SQL ``IN`` query per
  view / one pipelined ``HGETALL`` per entity), no decoding
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import random_requests, time_calls as _time, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis():
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    import redis

    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    from gpl_platform.features.definitions import ENTITY_KEYS

    return [EntityKey(join_keys=[ENTITY_KEYS[entity]], entity_values=[Value(string_val=i)]) for i in ids]


def _sqlite_floor(store, layout):
    con = sqlite3.connect(f"file:{store.config['online_store']['path']}?mode=ro", uri=True)
    from feast.infra.key_encoding_utils import serialize_entity_key

    project = store.config["project"]

    @lru_cache(maxsize=None)  # key bytes cached, as the client does: the floor is the store read alone
    def key(entity, i):
        return serialize_entity_key(_entity_keys(entity, [i])[0], entity_key_serialization_version=3)

    def read(user, items):
        for entity, ids in (("user", [user]), ("item", items)):
            keys = [key(entity, i) for i in ids]
            for view in layout.views_of[entity]:
                con.execute(f'SELECT entity_key, feature_name, value FROM "{project}_{view}" '
                            f"WHERE entity_key IN ({','.join('?' * len(keys))})", keys).fetchall()
    return read


def _redis_floor(redis_url: str, project: str):
    import redis
    from feast.infra.online_stores.helpers import _redis_key

    host, port = redis_url.split(":")
    client = redis.Redis(host=host, port=int(port))

    @lru_cache(maxsize=None)
    def key(entity, i):
        return _redis_key(project, _entity_keys(entity, [i])[0], entity_key_serialization_version=3)

    def read(user, items):
        pipe = client.pipeline(transaction=False)
        for entity, ids in (("user", [user]), ("item", items)):
            for i in ids:
                pipe.hgetall(key(entity, i))
        pipe.execute()
    return read


def run(n_items: int, out: str | Path | None = None, n_requests: int | None = None, seed: int = 0,
        data_dir: str | Path | None = None) -> dict:
    """Measure and return ``{"sqlite": {...}, "redis": {...}, "floor_sqlite": {...}, ..., "n_items": n}``;
    writes it as JSON to ``out`` when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpl_platform.config import load_settings
    from gpl_platform.features.fixtures import build_feature_world
    from gpl_platform.features.store import FeastStore

    n_requests = n_requests or (300 if n_items <= 200 else 100)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="gpl-bench-online-")
        data_dir = Path(tmp) / "data"
    settings = load_settings({"source": "simulator", "data_dir": str(data_dir), "seed": seed,
                              "simulator": {"n_items": max(2000, n_items), "n_users": 300, "n_days": 3}})
    redis_proc, redis_url = _start_redis()
    results: dict = {}
    try:
        t0 = time.perf_counter()
        world = build_feature_world(settings)
        build_s = time.perf_counter() - t0
        store = world["store"]
        requests = random_requests(world["dataset"], n_items, n_requests, seed)
        client = store.online_client()
        results["sqlite"] = _time(client.get, requests)
        results["floor_sqlite"] = _time(_sqlite_floor(store, client.layout), requests)
        results["sqlite_feast_sdk"] = _time(store.online_client(reader="feast").get, requests)
        if redis_url:
            redis_store = FeastStore(settings, redis_url=redis_url)
            redis_store.apply_if_changed(redis_store.spec())
            redis_store.materialize_days(world["days"])
            results["redis"] = _time(redis_store.online_client().get, requests)
            results["floor_redis"] = _time(_redis_floor(redis_url, redis_store.config["project"]), requests)
        results["n_items"] = n_items
        results["n_requests"] = n_requests
        results["n_features"] = len(client.get(requests[0][0], requests[0][1][:1]).columns)
        results["ratio_to_floor"] = {k: round(results[k]["p50_ms"] / results[f"floor_{k.split('_')[0]}"]["p50_ms"], 2)
                                     for k in ("sqlite", "sqlite_feast_sdk", "redis") if k in results}
        results["world_build_s"] = round(build_s, 1)
        results["redis_available"] = bool(redis_url)
    finally:
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json(results, out)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="candidate items per request")
    parser.add_argument("--out", default=None, help="JSON output file")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per store")
    args = parser.parse_args(argv)
    results = run(args.items, args.out, args.requests)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
