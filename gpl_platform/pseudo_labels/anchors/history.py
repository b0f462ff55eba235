"""History anchors (no LLM): the user's k most recent positives are the anchors (ablation baseline)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator, RawAnchor, UserHistory, history_anchor_texts


class HistoryAnchorGenerator(AnchorGenerator):
    """Anchors = texts of the user's k most recent distinct positives; logprob 0, gen_prob 1.

    These are the anchors themselves, not a fallback: ``is_fallback`` is False, and they are
    counted as ``stats['history_anchors']`` (``llm_anchors`` stays 0).
    """

    backend = "history"
    is_llm = False

    def __init__(self) -> None:
        self.model_id = "none"
        self.prompt_version = "none"
        self.params = {}

    def _generate_raw(self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter):
        out = []
        for h in histories:
            texts = history_anchor_texts(h, k)
            stats["history_anchors"] += len(texts)
            out.append([RawAnchor(t, 0.0) for t in texts])
        return out
