"""Benchmark: semantic-ID anchors on the warehouse's data (MovieLens-100K after `make demo`).

Measures, in one run and on the real catalog and clicks:
- RQ-VAE training time over the frozen item embeddings (not stored);
- SID generator training time on every positive before the last refit day (not stored), packed (a
  day's targets behind one prompt) against the same training with the prompt repeated per target;
- anchor generation for every distinct (user, history) of every day with that one model:
  batched prefix-constrained beam search (users decoded together, the prompt run once and its
  key/value cache shared by the beams) against the same search one user at a time, on a sample,
  both from the same model; users/s and the ratio.

    python bench/bench_sid.py --out reports/sid_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from gpl_platform.config import load_settings
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.pseudo_labels.anchor_stages import load_histories
from gpl_platform.pseudo_labels.encoder import load_item_embeddings
from gpl_platform.pseudo_labels.semantic_ids.generator import SidVocabulary, beam_search
from gpl_platform.pseudo_labels.semantic_ids.generator_training import train_sid_generator
from gpl_platform.pseudo_labels.semantic_ids.rqvae import fit_semantic_ids
from gpl_platform.pseudo_labels.semantic_ids.store import refit_day, training_sequences

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import write_json  # noqa: E402


def run(out=None, baseline_users: int = 100, seed: int = 0) -> dict:
    settings = load_settings()
    warehouse = Warehouse.for_settings(settings)
    if not warehouse.path.exists() or not warehouse.table_exists("item_embeddings"):
        raise SystemExit(f"{warehouse.path} has no item embeddings: run `make demo` (or gpl run) first")
    encoder_id = warehouse.query("SELECT DISTINCT encoder_id FROM item_embeddings")["encoder_id"].iloc[0]
    with warehouse.connect(read_only=True) as con:
        item_ids, vectors = load_item_embeddings(con, encoder_id)
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.perf_counter()
    fit = fit_semantic_ids(item_ids, vectors, settings.sid.semantic_ids, settings.seed, encoder_id)
    rqvae_seconds = time.perf_counter() - t0

    cfg = settings.sid.generator
    days = sorted(warehouse.written_days("user_histories"))
    refit = refit_day(days[-1], cfg.retrain_every_days)
    _, sequences, sessions = training_sequences(warehouse, refit)
    vocab = SidVocabulary(fit.item_ids, fit.codes)
    t0 = time.perf_counter()
    trained = train_sid_generator(vocab, sequences, cfg, settings.seed, "bench", user_sessions=sessions)
    train_seconds = time.perf_counter() - t0
    # baseline: the same training with the prompt repeated for every target instead of packed once per day
    t0 = time.perf_counter()
    unpacked = train_sid_generator(
        vocab, sequences, cfg, settings.seed, "bench", user_sessions=sessions, targets_per_row=1
    )
    unpacked_seconds = time.perf_counter() - t0

    # the histories the anchors stage gives the sid backend (anchors.history_max_items recent positives)
    histories = load_histories(warehouse, days, settings.anchors.history_max_items)
    prompts, exclude, seen = [], [], set()
    for history in histories["history"]:
        key = (history.user_id, history.item_ids)
        rows = [vocab.item_index[i] for i in history.item_ids if i in vocab.item_index]
        if key in seen or not rows:
            continue
        seen.add(key)
        prompts.append(np.array(rows[::-1], dtype=np.int64))
        exclude.append(set(rows))
    k = settings.anchors.k
    t0 = time.perf_counter()
    batched = beam_search(trained.model, vocab, prompts, k, cfg.beam_size, exclude)
    batched_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(prompts), size=min(baseline_users, len(prompts)), replace=False)
    t0 = time.perf_counter()
    single = [
        beam_search(trained.model, vocab, [prompts[n]], k, cfg.beam_size, [exclude[n]], batch_users=1)[0]
        for n in sample
    ]
    single_seconds = time.perf_counter() - t0
    same = all([r for r, _ in a] == [r for r, _ in batched[n]] for a, n in zip(single, sample))

    result = {
        "benchmark": "sid_anchors",
        "dataset": settings.source,
        "items": len(item_ids),
        "rqvae": {
            "seconds": round(rqvae_seconds, 1),
            "codebook_size": fit.codebook_size,
            "reconstruction_relative_error": round(fit.metrics["reconstruction_relative_error"], 4),
            "collision_share": round(fit.metrics["collision_share"], 4),
        },
        "generator_training": {
            "refit_day": str(refit),
            "train_end": str(refit - timedelta(1)),
            "objective": cfg.objective,
            "users": trained.metrics["users"],
            "positives": trained.metrics["positives"],
            "training_targets": trained.metrics["training_targets"],
            "epochs": cfg.epochs,
            "seconds": round(train_seconds, 1),
            "valid_recall@10": round(trained.metrics["valid_recall@10"], 4),
            "valid_popularity_recall@10": round(trained.metrics["valid_popularity_recall@10"], 4),
            "valid_nll_per_item": round(trained.metrics["valid_nll_per_item"], 3),
            "unpacked_seconds": round(unpacked_seconds, 1),
            "packing_speedup": round(unpacked_seconds / train_seconds, 2),
            "unpacked_valid_nll_per_item": round(unpacked.metrics["valid_nll_per_item"], 3),
        },
        "generation": {
            "distinct_histories": len(prompts),
            "k": k,
            "beam_size": cfg.beam_size,
            "batched_seconds": round(batched_seconds, 2),
            "batched_users_per_s": round(len(prompts) / batched_seconds, 1),
            "one_at_a_time_users": len(sample),
            "one_at_a_time_users_per_s": round(len(sample) / single_seconds, 1),
            "speedup": round((len(prompts) / batched_seconds) / (len(sample) / single_seconds), 2),
            "same_anchors_on_sample": bool(same),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    write_json(result, out)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--baseline-users", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.baseline_users), indent=2))
