"""Serving latency of the pre-ranker: user id + N recalled candidate ids -> scores, including the online
feature retrieval (SQLite online store), against the feature retrieval alone (the floor), one run.

    python bench/bench_prerank_scoring.py --items 1000 --out reports/prerank_scoring_1000.json

Builds a simulator world with >= N items (random unit item embeddings, no model load), trains a
pre-ranker for a few epochs on its point-in-time features (latency does not depend on quality),
then times ``PreRankScorer.score(user, items)`` and ``OnlineFeatureClient.get(user, items)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import random_requests, time_calls, write_json  # noqa: E402


def run(n_items: int = 1000, out: str | Path | None = None, n_requests: int = 100, seed: int = 0) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from gpl_platform.config import load_settings
    from gpl_platform.features.fixtures import build_feature_world
    from gpl_platform.prerank.data import attach_features, load_candidates
    from gpl_platform.prerank.serving import PreRankScorer
    from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_preranker

    tmp = Path(tempfile.mkdtemp(prefix="gpl-bench-scoring-"))
    try:
        settings = load_settings({"source": "simulator", "data_dir": str(tmp / "data"), "seed": seed,
                                  "simulator": {"n_items": max(2000, n_items), "n_users": 300, "n_days": 3}})
        world = build_feature_world(settings)
        store = world["store"]
        cands = load_candidates(world["warehouse"], world["days"])
        cands = cands[cands["exposed"]].head(5000)
        matrix, columns = attach_features(store, cands, "prerank_v1")
        labels = cands["clicked"].to_numpy(np.float32)
        model, _ = train_preranker(TrainingRows(matrix, labels, np.ones(len(labels), np.float32),
                                                np.zeros(len(labels), bool)), columns, matrix[:500],
                                   labels[:500].astype(int), config=TrainConfig(epochs=2, seed=seed))
        model_dir = model.save(tmp / "model", {"feature_service": "prerank_v1"})
        scorer = PreRankScorer(model_dir, store)
        requests = random_requests(world["dataset"], n_items, n_requests, seed)
        features_only = time_calls(scorer.client.get, requests)
        scoring = time_calls(scorer.score, requests)
        feature_matrix = scorer.client.get(*requests[0]).matrix
        model_only = time_calls(lambda m: scorer.model.predict(m), [(feature_matrix,)] * n_requests)
        result = {"scoring_sqlite": scoring, "floor_feature_retrieval_sqlite": features_only,
                  "model_only": model_only, "n_items": n_items, "n_requests": n_requests,
                  "ratio_to_floor": round(scoring["p50_ms"] / features_only["p50_ms"], 2),
                  "torch_threads": torch.get_num_threads(), "n_features": len(columns),
                  "loadavg_1m": os.getloadavg()[0]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(result, out)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.items, args.out, args.requests), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
