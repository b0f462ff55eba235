"""An anchor generator and an encoder that hand their work to an engine in fixed-size chunks.

They wrap the real objects without changing what they are (same cache signature, encoder id and
outputs), so the anchor cache and everything keyed on them see no difference. Both engines cut the
same chunks, which is what makes their outputs identical: a batched model's numbers can depend on
which inputs share a batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial

import numpy as np
import pandas as pd

from gpl_platform.engine.base import Engine, Shared
from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator, AnchorResult, UserHistory


def _chunks(items: Sequence, size: int) -> list[list]:
    items = list(items)
    return [items[start : start + size] for start in range(0, len(items), max(1, size))]


def _identity(obj):
    return obj


def _generate_chunk(generator: AnchorGenerator, payload: tuple[list[UserHistory], int]) -> AnchorResult:
    histories, k = payload
    return generator.generate(histories, k, progress=False)


def _encode_chunk(encoder, texts: list[str]) -> np.ndarray:
    return np.asarray(encoder.encode(texts), dtype=np.float32)


class EngineAnchorGenerator(AnchorGenerator):
    """``generator`` run by ``engine``, ``chunk`` histories per call. A pass-through when the engine is
    local and the histories fit one chunk."""

    def __init__(self, generator: AnchorGenerator, engine: Engine, chunk: int | None = None):
        self.inner, self.engine = generator, engine
        self.chunk = int(chunk or engine.streaming.anchor_batch_users)
        for attr in ("backend", "model_id", "prompt_version", "is_llm", "pad_with_history", "tokens_per_anchor"):
            setattr(self, attr, getattr(generator, attr))
        self.params = getattr(generator, "params", {})

    def cache_signature(self) -> str:
        return self.inner.cache_signature()

    def lineage_signature(self) -> str:
        return self.inner.lineage_signature()

    def _generate_raw(self, histories, k, progress, stats):  # pragma: no cover - generate() is overridden
        raise NotImplementedError("EngineAnchorGenerator hands whole generate() calls to its engine")

    def generate(self, histories: Sequence[UserHistory], k: int, progress: bool = True) -> AnchorResult:
        chunks = _chunks(histories, self.chunk)
        if len(chunks) <= 1 and self.engine.name == "local":
            return self.inner.generate(list(histories), k, progress=progress)
        shared = Shared(("anchors", self.inner.cache_signature()), partial(_identity, self.inner))
        results = self.engine.map(_generate_chunk, shared, [(chunk, k) for chunk in chunks])
        stats: Counter = Counter()
        for result in results:
            stats.update(result.stats)
        frames = [r.anchors for r in results]
        anchors = pd.concat(frames, ignore_index=True) if frames else self.inner.generate([], k).anchors
        return AnchorResult(anchors=anchors, stats={key: int(v) for key, v in stats.items()})


class EngineEncoder:
    """``encoder`` run by ``engine``, ``chunk`` texts per call. A worker loads its own copy of a
    :class:`~gpl_platform.pseudo_labels.encoder.SentenceEncoder` from the model directory (the package that ships
    the weights must be installed there); other encoders travel pickled."""

    def __init__(self, encoder, engine: Engine, chunk: int | None = None):
        self.inner, self.engine = encoder, engine
        self.chunk = int(chunk or engine.streaming.encode_batch_texts)

    @property
    def encoder_id(self) -> str:
        return self.inner.encoder_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def _shared(self) -> Shared:
        from gpl_platform.pseudo_labels.encoder import SentenceEncoder

        if self.engine.name != "local" and isinstance(self.inner, SentenceEncoder):
            build = partial(SentenceEncoder, self.inner.model_dir, self.inner.device, self.inner.name)
        else:
            build = partial(_identity, self.inner)
        return Shared(("encoder", self.inner.encoder_id), build)

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        texts = list(texts)
        chunks = _chunks(texts, self.chunk)
        if len(chunks) <= 1 and self.engine.name == "local":
            return self.inner.encode(texts, batch_size=batch_size, progress=progress)
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(self.engine.map(_encode_chunk, self._shared(), chunks))
