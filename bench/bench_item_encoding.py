"""Benchmark: item encoding throughput of the frozen encoder, batched vs one text at a time.

Texts are synthetic item descriptions shaped like MovieLens items ("Title (year) | genres |
short plot"), 15-30 tokens. The batched run encodes all ``n_items`` (median of ``repeats``);
the one-at-a-time baseline encodes a subsample of ``single_items`` texts with one ``encode``
call each and its rate is extrapolated. Model load time is reported separately.

    python bench/bench_item_encoding.py --items 2000 --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from gpl_platform.pseudo_labels.encoder import SentenceEncoder

_WORDS = (
    "space war love family detective robot city river king ghost school summer island secret "
    "journey dragon music heist doctor island storm village empire mirror winter dream ocean "
    "revenge friendship train desert castle mystery comedy hero prison garden"
).split()
_GENRES = (
    "Action Adventure Animation Comedy Crime Documentary Drama Fantasy Horror Musical Romance Sci-Fi Thriller War "
    "Western"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        title = " ".join(rng.choice(_WORDS, rng.integers(1, 4))).title()
        genres = "|".join(rng.choice(_GENRES, rng.integers(1, 4), replace=False))
        plot = " ".join(rng.choice(_WORDS, rng.integers(8, 20)))
        texts.append(f"{title} ({1950 + i % 70}) | {genres} | {plot}")
    return texts


def run(
    n_items: int,
    out: Path | None = None,
    *,
    batch_size: int = 128,
    single_items: int = 200,
    repeats: int = 2,
    encoder: SentenceEncoder | None = None,
) -> dict:
    texts = make_texts(n_items)
    t0 = time.perf_counter()
    enc = encoder or SentenceEncoder()
    enc.encode(texts[:8])  # load + warm-up
    load_seconds = time.perf_counter() - t0

    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        vecs = enc.encode(texts, batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))

    sub = texts[: min(single_items, n_items)]
    t0 = time.perf_counter()
    single = np.concatenate([enc.encode([t], batch_size=1) for t in sub])
    single_seconds = time.perf_counter() - t0
    max_abs_diff = float(np.abs(single - vecs[: len(sub)]).max())

    rate = n_items / seconds
    single_rate = len(sub) / single_seconds
    result = {
        "items_per_s": rate,
        "single_items_per_s": single_rate,
        "ratio": rate / single_rate,
        "n_items": int(n_items),
        "seconds": seconds,
        "seconds_runs": times,
        "batch_size": int(batch_size),
        "encoder_id": enc.encoder_id,
        "dim": int(vecs.shape[1]),
        "model_load_seconds": load_seconds,
        "single": {
            "method": "one encode([text]) call per item",
            "subsampled": len(sub) < n_items,
            "n_items": len(sub),
            "seconds": single_seconds,
            "note": "rate measured on the first texts and extrapolated linearly",
        },
        "check": {"max_abs_diff_batched_vs_single": max_abs_diff},
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "torch_threads": _torch_threads(),
        },
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # pragma: no cover
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--single-items", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = run(args.items, args.out, batch_size=args.batch_size, single_items=args.single_items, repeats=args.repeats)
    print(
        json.dumps(
            {k: r[k] for k in ("n_items", "seconds", "items_per_s", "single_items_per_s", "ratio", "batch_size")},
            indent=2,
        )
    )
    print("check:", r["check"])


if __name__ == "__main__":
    main()
