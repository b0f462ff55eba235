"""Pre-rank scoring latency: user id + N recalled candidate ids -> scores, in one run:

* ``in_process``: ``PreRankScorer.score`` with the item side kept in memory (the service's path)
* ``no_cache``: the same scorer reading the candidates' stored features per request (the baseline)
* ``http``: ``POST /score`` against ``gpl serve`` started on 127.0.0.1 for the run (one keep-alive
  connection, as a ranker's connection pool would hold)
* ``load``: ``--clients`` concurrent clients for ``--seconds`` against the same server: throughput,
  latency and errors
* ``by_shape``: ``in_process`` for the ``two_tower`` (precomputed item tower) and ``cold`` shapes

    gpl bench prerank-scoring --items 1000 --out reports/prerank_scoring_1000.json

Builds a simulator world with >= N items (random unit item embeddings, no model load), trains each
pre-ranker for two epochs on its point-in-time features (latency does not depend on quality). The
machine is shared: the load average is recorded before, after and every 5 s during the run
(``loadavg_1m_during``; the load test itself adds about 2 to it); read the numbers with it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _support import build_feature_world, free_port  # noqa: E402
from _timing import latency_stats, random_requests, time_calls, write_json  # noqa: E402


def _train(world, shape: str, seed: int, directory: Path) -> Path:
    from gpl_platform.prerank.data import attach_features, load_candidates
    from gpl_platform.prerank.model import ModelConfig
    from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_preranker

    cands = load_candidates(world["warehouse"], world["days"])
    cands = cands[cands["exposed"]].head(5000).reset_index(drop=True)
    matrix, columns = attach_features(world["store"], cands, "prerank_v2")
    labels = cands["clicked"].to_numpy(np.float32)
    ids = dict(user_ids=cands["user_id"].to_numpy(), item_ids=cands["item_id"].to_numpy())
    model, _ = train_preranker(
        TrainingRows(matrix, labels, np.ones(len(labels), np.float32), np.zeros(len(labels), bool), **ids),
        columns,
        matrix[:500],
        labels[:500].astype(int),
        ModelConfig(shape=shape),
        TrainConfig(budget="epochs", epochs=2, seed=seed),
        valid_user_ids=ids["user_ids"][:500],
        valid_item_ids=ids["item_ids"][:500],
        user_vocab=world["dataset"].users["user_id"].tolist(),
        item_vocab=world["dataset"].items["item_id"].tolist(),
    )
    return model.save(directory / shape, {"feature_service": "prerank_v2", "version": f"bench-{shape}"})


class _Client:
    """One keep-alive HTTP connection to the scoring service."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def score(self, user: str, items: list[str]) -> int:
        self.conn.request(
            "POST",
            "/score",
            body=json.dumps({"user_id": user, "item_ids": items}),
            headers={"Content-Type": "application/json"},
        )
        answer = self.conn.getresponse()
        body = answer.read()
        if answer.status == 200:
            json.loads(body)
        return answer.status


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gpl serve did not start: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.3)


def _load_test(port: int, requests, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(k: int):
        client = _Client(port)
        mine, bad, i = [], [], k
        while time.monotonic() < stop:
            user, items = requests[i % len(requests)]
            i += clients
            t0 = time.perf_counter()
            try:
                status = client.score(user, items)
                if status != 200:
                    bad.append(f"HTTP {status}")
            except Exception as exc:  # count it, keep going with a fresh connection
                bad.append(f"{type(exc).__name__}: {exc}")
                client = _Client(port)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        **latency_stats(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
    }


def run(
    n_items: int = 1000,
    out: str | Path | None = None,
    n_requests: int = 200,
    seed: int = 0,
    clients: int = 8,
    seconds: float = 30.0,
) -> dict:
    import torch

    from gpl_platform.config import load_settings
    from gpl_platform.prerank.serving import PreRankScorer

    loadavg_before = os.getloadavg()
    samples, sampling = [], threading.Event()

    def sample_load():  # the 1-minute load average every 5 s: the machine is shared, read the numbers with it
        while not sampling.wait(5.0):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    tmp = Path(tempfile.mkdtemp(prefix="gpl-bench-scoring-"))
    server = None
    try:
        overrides = {
            "source": "simulator",
            "data_dir": str(tmp / "data"),
            "seed": seed,
            "simulator": {"n_items": max(2000, n_items), "n_users": 300, "n_days": 3},
        }
        settings = load_settings(overrides)
        world = build_feature_world(settings)
        models = {shape: _train(world, shape, seed, tmp / "models") for shape in ("mlp", "two_tower", "cold")}
        torch.set_num_threads(settings.serving.torch_threads)  # as gpl serve runs it
        requests = random_requests(world["dataset"], n_items, n_requests, seed)
        store = world["store"]
        cached = PreRankScorer(models["mlp"], store)
        result: dict = {
            "in_process": time_calls(cached.score, requests),
            "no_cache": time_calls(PreRankScorer(models["mlp"], store, cache_items=False).score, requests),
        }
        result["in_process_parts"] = {
            "user_inputs": time_calls(lambda u, _: cached.reader.inputs("user", [u]), requests),
            "model_only": time_calls(lambda m: cached.model.predict(m), [(cached.matrix(*requests[0]),)] * n_requests),
        }
        result["by_shape"] = {
            shape: time_calls(PreRankScorer(models[shape], store).score, requests) for shape in ("two_tower", "cold")
        }

        port = free_port()
        env = {
            **os.environ,
            "GPL_SOURCE": "simulator",
            "GPL_DATA_DIR": str(tmp / "data"),
            "GPL_SEED": str(seed),
            "GPL_SIMULATOR__N_ITEMS": str(max(2000, n_items)),
            "GPL_SIMULATOR__N_USERS": "300",
            "GPL_SIMULATOR__N_DAYS": "3",
        }
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "gpl"), "serve", "--port", str(port), "--model", str(models["mlp"])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        _wait_ready(port, server)
        client = _Client(port)
        result["http"] = time_calls(client.score, requests)
        if clients and seconds:
            result["load"] = _load_test(port, requests, clients, seconds)
        result.update(
            {
                "n_items": n_items,
                "n_requests": n_requests,
                "n_features": len(cached.layout.columns),
                "n_catalog_items": len(cached.items.ids),
                "item_side_build_s": round(cached.items.built_s, 3),
                "torch_threads": torch.get_num_threads(),
                "online_store": store.online_store_type,
                "ratio_no_cache_to_in_process_p50": round(
                    result["no_cache"]["p50_ms"] / result["in_process"]["p50_ms"], 2
                ),
                "loadavg_before": [round(x, 2) for x in loadavg_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "loadavg_1m_during": {
                    "min": round(min(samples, default=0.0), 2),
                    "max": round(max(samples, default=0.0), 2),
                    "mean": round(float(np.mean(samples)) if samples else 0.0, 2),
                    "samples": len(samples),
                },
                "cpu_count": os.cpu_count(),
            }
        )
    finally:
        sampling.set()
        if server is not None and server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(result, out)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="load test: concurrent clients (0: no load test)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load test duration")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process's libraries: no model hub (`gpl` sets it too)
    print(json.dumps(run(args.items, args.out, args.requests, clients=args.clients, seconds=args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
