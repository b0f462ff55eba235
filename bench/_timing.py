"""Shared helpers of the benchmarks: p50/p99 over timed calls after a warm-up, request sampling, JSON out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def latency_stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "n": len(ms),
    }


def time_calls(fn, requests, warmup: int = 10) -> dict:
    """Latency of ``fn(*request)`` over ``requests`` (the first ``warmup`` calls are not timed)."""
    for args in requests[:warmup]:
        fn(*args)
    seconds = []
    for args in requests:
        t0 = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - t0)
    return latency_stats(seconds)


def random_requests(dataset, n_items: int, n_requests: int, seed: int) -> list[tuple[str, list[str]]]:
    """(user_id, n_items distinct candidate item ids) pairs drawn from a dataset's users and catalog."""
    rng = np.random.default_rng(seed)
    users = dataset.users["user_id"].astype(str).to_numpy()
    items = dataset.items["item_id"].astype(str).to_numpy()
    return [
        (str(rng.choice(users)), rng.choice(items, size=n_items, replace=False).tolist()) for _ in range(n_requests)
    ]


def write_json(result: dict, out) -> None:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
