"""Online scoring for downstream rankers: user id + recalled candidate ids -> pre-rank scores.

Features come from the Feast online store through the same `feature_matrix` as training, so a
candidate scores online exactly as it would offline at the same feature time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from gpl_platform.prerank.model import PreRanker


@dataclass
class ScoredCandidates:
    item_ids: list[str]
    scores: np.ndarray
    unknown_user: bool
    unknown_items: list[str]


class PreRankScorer:
    def __init__(self, model_dir: Path, store):
        self.model, self.lineage = PreRanker.load(model_dir)
        self.service = self.lineage.get("feature_service", "prerank_v1")
        self.client = store.online_client(self.service)

    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoredCandidates:
        features = self.client.get(user_id, list(item_ids))
        self.model.layout.check(features.columns)
        return ScoredCandidates(list(item_ids), self.model.predict(features.matrix), bool(features.unknown_user),
                                list(features.unknown_items))
