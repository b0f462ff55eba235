"""Semantic-ID anchors (the paper's route): a generator trained on users' ID sequences proposes the
IDs of what the user will want next; each generated ID is an anchor with its sequence probability.

An anchor's text is ``"sid 12-3-7-0 · <title>"``: the ID (which names exactly one item) and, for
people reading tables, the title of that item. Its vector does not come from encoding the text but
from the semantic-ID table (``SidGeneratorConfig.anchor_vector``): the mean embedding of the items
under the ID's codes, or the RQ-VAE decoding of the codes. Fallback anchors (no model yet, no
known item in the history) are history texts and are encoded like any text anchor.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import numpy as np

from gpl_platform.anchor_settings import SidGeneratorConfig
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine.threads import torch_threads
from gpl_platform.pseudo_labels.anchors.base import (
    FALLBACK_NO_SID_MODEL,
    AnchorGenerator,
    RawAnchor,
    UserHistory,
    compact_item_text,
    history_anchor_texts,
    stable_hash,
)
from gpl_platform.pseudo_labels.semantic_ids.generator import TrainedSidGenerator, beam_search
from gpl_platform.pseudo_labels.semantic_ids.store import SemanticIds, generator_for_day, refit_day, sid_string

log = logging.getLogger(__name__)
_SID_TEXT = re.compile(r"^sid (\d+(?:-\d+)*)\b")


class SidAnchorGenerator(AnchorGenerator):
    """``backend="sid"``. The family object (from
    :func:`gpl_platform.pseudo_labels.model_loading.anchor_generator`) is not bound to a model; :meth:`for_day`
    returns the generator bound to the model serving that day (trained on positives before its refit day, or None
    while there are too few)."""

    backend = "sid"

    def __init__(
        self,
        warehouse: Warehouse,
        sids: SemanticIds,
        cfg: SidGeneratorConfig,
        seed: int,
        artifacts_dir: Path,
        item_texts: dict[str, str] | None = None,
        trained: TrainedSidGenerator | None = None,
        refit: date | None = None,
    ):
        self.warehouse, self.sids, self.cfg, self.seed = warehouse, sids, cfg, seed
        self.artifacts_dir = Path(artifacts_dir)
        self.trained, self.refit = trained, refit
        self.prompt_version = f"sid:{sids.version}"
        self.model_id = trained.version if trained else ("none" if refit else "sid-generator")
        self.params = {"generator": cfg.model_dump(), "seed": seed}
        self.tokens_per_anchor = int(sids.codes.shape[1])
        if item_texts is None:
            item_texts = dict(warehouse.query("SELECT item_id, text FROM items").itertuples(index=False))
        self.item_texts = item_texts
        self._row_of_sid = {sid_string(c): r for r, c in enumerate(sids.codes)}
        self._by_refit: dict[date, SidAnchorGenerator] = {}

    def lineage_signature(self) -> str:
        return stable_hash(
            {"backend": self.backend, "prompt_version": self.prompt_version, "params": self.params}, n=32
        )

    def cache_signature(self) -> str:
        return stable_hash({"family": self.lineage_signature(), "model": self.model_id}, n=32)

    def for_day(self, day: date) -> SidAnchorGenerator:
        refit = refit_day(day, self.cfg.retrain_every_days)
        if refit not in self._by_refit:
            trained = generator_for_day(self.warehouse, self.sids, day, self.cfg, self.seed, self.artifacts_dir)
            self._by_refit[refit] = SidAnchorGenerator(
                self.warehouse, self.sids, self.cfg, self.seed, self.artifacts_dir, self.item_texts, trained, refit
            )
        return self._by_refit[refit]

    def anchor_text(self, item_row: int) -> str:
        item = self.sids.item_ids[item_row]
        return f"sid {sid_string(self.sids.codes[item_row])} · {compact_item_text(self.item_texts.get(item, item))}"

    def anchor_vectors(self, texts: Sequence[str], encoder) -> np.ndarray:
        texts = list(texts)
        rows = np.full(len(texts), -1, dtype=np.int64)
        for n, text in enumerate(texts):
            match = _SID_TEXT.match(text)
            if match:
                rows[n] = self._row_of_sid.get(match.group(1), -1)
                if rows[n] < 0:
                    raise ValueError(
                        f"anchor {text!r} names no semantic ID of version {self.sids.version}: "
                        "re-materialize the anchors"
                    )
        out = np.zeros((len(texts), self.sids.item_vectors.shape[1]), dtype=np.float32)
        is_sid = rows >= 0
        if is_sid.any():
            out[is_sid] = self.sids.anchor_vectors(rows[is_sid], self.cfg.anchor_vector)
        if (~is_sid).any():
            out[~is_sid] = super().anchor_vectors([t for t, s in zip(texts, is_sid) if not s], encoder)
        return out

    def _generate_raw(self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter):
        if self.trained is None:
            if self.refit is None:
                raise RuntimeError("the sid family generator has no model: call for_day(day) first")
            # Too few positives before the refit day to train a generator: history anchors, counted.
            stats["fallback_users"] += len(histories)
            stats[f"fallback_{FALLBACK_NO_SID_MODEL}"] += len(histories)
            return [
                [RawAnchor(t, 0.0, True, FALLBACK_NO_SID_MODEL) for t in history_anchor_texts(h, k)] for h in histories
            ]
        vocab = self.trained.vocab
        prompts, exclude = [], []
        for h in histories:
            rows = [vocab.item_index[i] for i in h.item_ids if i in vocab.item_index]
            stats["sid_unknown_history_items"] += len(h.item_ids) - len(rows)
            prompts.append(np.array(rows[: self.cfg.max_history_items][::-1], dtype=np.int64))  # oldest first
            exclude.append(set(rows) if self.cfg.exclude_history else set())
        known = [n for n, p in enumerate(prompts) if len(p)]
        with torch_threads(self.cfg.torch_threads):
            found = beam_search(
                self.trained.model,
                vocab,
                [prompts[n] for n in known],
                k,
                self.cfg.beam_size,
                [exclude[n] for n in known],
            )
        out: list[list[RawAnchor]] = [[] for _ in histories]
        for n, items in zip(known, found):
            out[n] = [RawAnchor(self.anchor_text(row), score) for row, score in items]
            stats["sid_anchors"] += len(items)
        stats["sid_users_without_known_items"] += len(histories) - len(known)
        return out
