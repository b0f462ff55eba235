"""Shared latency helpers of the benchmarks: p50/p99 over timed calls after a warm-up."""

from __future__ import annotations

import time

import numpy as np


def latency_stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "n": len(ms)}


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
