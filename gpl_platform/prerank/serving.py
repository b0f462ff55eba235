"""Online scoring for downstream rankers: user id + recalled candidate ids -> pre-rank scores.

Features come from the Feast online store through the same `feature_matrix` as training, so a
candidate scores online exactly as it would offline at the same feature time. The id shapes also
score by the ids themselves: an id outside the model's vocabulary (a user or item newer than the
model) scores through the out-of-vocabulary bucket and is reported, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpl_platform.prerank.model import PreRanker


@dataclass
class ScoredCandidates:
    item_ids: list[str]
    scores: np.ndarray
    unknown_user: bool            # not in the online store: user features are defaults
    unknown_items: list[str]      # not in the online store: item features are defaults
    out_of_vocabulary_user: bool = False  # id shapes: the user scored through the OOV embedding
    out_of_vocabulary_items: list[str] = field(default_factory=list)


class PreRankScorer:
    def __init__(self, model_dir: Path, store):
        self.model, self.lineage = PreRanker.load(model_dir)
        self.service = self.lineage.get("feature_service", "prerank_v1")
        self.client = store.online_client(self.service)

    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoredCandidates:
        features = self.client.get(user_id, list(item_ids))
        self.model.layout.check(features.columns)
        user_ids = [features.user_id] * len(features.item_ids)
        scored = ScoredCandidates(list(item_ids), self.model.predict(features.matrix, user_ids, features.item_ids),
                                  bool(features.unknown_user), list(features.unknown_items))
        if self.model.uses_ids:
            scored.out_of_vocabulary_user = bool(self.model.user_vocab.unknown([features.user_id]))
            scored.out_of_vocabulary_items = self.model.item_vocab.unknown(features.item_ids)
        return scored
