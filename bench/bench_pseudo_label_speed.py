"""Benchmark: vectorized pseudo-label scoring vs the per-user / per-pair loop baseline.

Synthetic but shaped like the pipeline: users with about ``cands_per_user`` recalled candidates
each (Poisson counts, unsorted rows), ``anchors_per_user`` anchors, a catalog of ``n_items``
384-d L2-normalized item vectors. The vectorized scorer runs on all ``n_candidates`` (one warm-up,
then the median of ``repeats`` timed runs); the loop baseline runs on a random subsample of users
(``baseline_candidates`` rows, it is very slow) and its rate is extrapolated; both are checked for
equal results on that subsample.

    python bench/bench_pseudo_label_speed.py --candidates 1000000 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from gpl_platform.pseudo_labels.similarity import score_candidates, score_candidates_loop


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_case(n_candidates: int, *, n_items=20_000, d=384, cands_per_user=200, anchors_per_user=5, seed=0):
    rng = np.random.default_rng(seed)
    n_users = max(1, n_candidates // cands_per_user)
    counts = rng.poisson(cands_per_user, n_users).astype(np.int64) + 1
    counts = np.floor(counts * (n_candidates / counts.sum())).astype(np.int64)
    counts[: n_candidates - counts.sum()] += 1
    cand_user = rng.permutation(np.repeat(np.arange(n_users), counts))
    cand_item = rng.integers(0, n_items, cand_user.size)
    items = _norm(rng.standard_normal((n_items, d)))
    anchor_user = np.repeat(np.arange(n_users), anchors_per_user)
    anchors = _norm(rng.standard_normal((anchor_user.size, d)))
    return cand_user, cand_item, items, anchors, anchor_user


def run(
    n_candidates: int,
    out: Path | None = None,
    *,
    baseline_candidates: int = 20_000,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    cu, ci, items, anchors, au = make_case(n_candidates, seed=seed)

    score_candidates(cu[:10_000], ci[:10_000], items, anchors, au)  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        res = score_candidates(cu, ci, items, anchors, au)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))

    # baseline on a subsample of whole users (so per-user work is representative)
    rng = np.random.default_rng(seed + 1)
    users = rng.permutation(np.unique(cu))
    per_user = np.bincount(cu)
    take = users[: max(1, int(np.searchsorted(np.cumsum(per_user[users]), baseline_candidates)) + 1)]
    sub = np.flatnonzero(np.isin(cu, take))
    t0 = time.perf_counter()
    base = score_candidates_loop(cu[sub], ci[sub], items, anchors, au)
    base_seconds = time.perf_counter() - t0
    max_abs_diff = float(np.nanmax(np.abs(base.similarity_max - res.similarity_max[sub])))
    same_argmax = bool(np.array_equal(base.argmax_anchor, res.argmax_anchor[sub]))

    rate = n_candidates / seconds
    base_rate = sub.size / base_seconds
    result = {
        "candidates_per_s": rate,
        "baseline_candidates_per_s": base_rate,
        "ratio": rate / base_rate,
        "n_candidates": int(n_candidates),
        "seconds": seconds,
        "seconds_runs": times,
        "baseline": {
            "method": "score_candidates_loop: per-user loop, per-(candidate, anchor) np.dot",
            "subsampled": bool(sub.size < n_candidates),
            "n_candidates": int(sub.size),
            "seconds": base_seconds,
            "extrapolated_seconds_for_all": n_candidates / base_rate,
            "note": "baseline rate measured on a subsample of whole users and extrapolated linearly",
        },
        "check": {"max_abs_diff_similarity_max": max_abs_diff, "same_argmax": same_argmax},
        "shape": {
            "n_users": int(np.unique(cu).size),
            "anchors_per_user": 5,
            "dim": int(items.shape[1]),
            "n_items": int(items.shape[0]),
            "candidate_rows_sorted_by_user": False,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--baseline-candidates", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = run(args.candidates, args.out, baseline_candidates=args.baseline_candidates, repeats=args.repeats)
    print(
        json.dumps(
            {k: r[k] for k in ("n_candidates", "seconds", "candidates_per_s", "baseline_candidates_per_s", "ratio")},
            indent=2,
        )
    )
    print("check:", r["check"])


if __name__ == "__main__":
    main()
