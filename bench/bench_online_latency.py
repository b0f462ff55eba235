"""Online feature retrieval latency: one user plus N candidate items, SQLite and Redis online stores,
against a direct read of the same rows from the same store (the floor), in one run.

    gpl bench online-latency --items 100 --out reports/online_100.json

Builds a simulator world (>= N items, random unit item embeddings, no model load) in a temp data
dir, materializes it into SQLite and (when ``redis-server`` is installed) into a Redis started
on 127.0.0.1 for the run, then times per store:

* ``<store>``: ``OnlineFeatureClient.get(user, items)``: the ``prerank_v2`` service through
  ``FeatureStore.get_online_features``, on-demand views included (what ``feast serve`` runs),
  decoded into the float32 matrix
* ``<store>_stored``: the stored features of the user and the items with the derived inputs
  computed in process (what the scoring service does when it does not keep the item side)
* ``floor_<store>``: fetching the same rows' bytes only (SQL ``IN`` query per view / one pipelined
  ``HGETALL`` per entity), no decoding
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
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import random_requests, write_json  # noqa: E402
from _timing import time_calls as _time  # noqa: E402

from gpl_platform.data.sql import quote_identifier  # noqa: E402


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


def run(
    n_items: int,
    out: str | Path | None = None,
    n_requests: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict:
    """Measure and return ``{"sqlite": {...}, "redis": {...}, "floor_sqlite": {...}, ..., "n_items": n}``;
    writes it as JSON to ``out`` when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpl_platform.config import load_settings
    from gpl_platform.features.store import FeastStore
    from gpl_platform.prerank.serving import InputReader
    from tests.helpers import build_feature_world

    n_requests = n_requests or (300 if n_items <= 200 else 100)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="gpl-bench-online-")
        data_dir = Path(tmp) / "data"
    settings = load_settings(
        {
            "source": "simulator",
            "data_dir": str(data_dir),
            "seed": seed,
            "simulator": {"n_items": max(2000, n_items), "n_users": 300, "n_days": 3},
        }
    )
    redis_proc, redis_url = _start_redis()
    results: dict = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        t0 = time.perf_counter()
        world = build_feature_world(settings)
        build_s = time.perf_counter() - t0
        stores = {"sqlite": world["store"]}
        if redis_url:
            redis_settings = settings.model_copy(
                update={
                    "feature_store": settings.feature_store.model_copy(
                        update={"online_store": "redis", "redis": redis_url}
                    )
                }
            )
            stores["redis"] = FeastStore(redis_settings)
            stores["redis"].apply_if_changed(world["store"].spec())
            stores["redis"].materialize_days(world["days"])
        requests = random_requests(world["dataset"], n_items, n_requests, seed)
        views_of = {
            e: [v for v, i in world["store"].spec().views().items() if i["entity"] == e] for e in ("user", "item")
        }
        for name, store in stores.items():
            client = store.online_client()
            reader = InputReader(store, "prerank_v2")
            results[name] = _time(client.get, requests)
            results[f"{name}_stored"] = _time(
                lambda u, items: (reader.inputs("user", [u]), reader.inputs("item", items)), requests
            )
            results[f"floor_{name}"] = _time(
                _sqlite_floor(store, views_of)
                if name == "sqlite"
                else _redis_floor(redis_url, store.config["project"]),
                requests,
            )
        results["n_items"] = n_items
        results["n_requests"] = n_requests
        results["n_features"] = len(stores["sqlite"].online_client().columns)
        results["ratio_to_floor"] = {
            k: round(results[k]["p50_ms"] / results[f"floor_{k.split('_')[0]}"]["p50_ms"], 2)
            for k in ("sqlite", "sqlite_stored", "redis", "redis_stored")
            if k in results
        }
        results["world_build_s"] = round(build_s, 1)
        results["redis_available"] = bool(redis_url)
        results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
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
