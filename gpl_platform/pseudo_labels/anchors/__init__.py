"""Interest-anchor library (no Dagster imports here).

Backends: ``history`` (no LLM, ablation baseline), ``smollm`` (SmolLM2-135M-Instruct in-process),
``openai`` (any OpenAI-compatible HTTP server such as vLLM or llama.cpp server), ``sid`` (semantic-ID
anchors from a generator trained on users' ID sequences; needs the warehouse, see anchors/semantic_id_backend.py).

    from gpl_platform.pseudo_labels.anchors import make_anchor_generator, UserHistory
    gen = make_anchor_generator("smollm", batch_size=16)
    result = gen.generate(histories, k=5)          # AnchorResult(anchors=DataFrame, stats=dict)

    from gpl_platform.pseudo_labels.anchors.cache import generate_with_cache
    df, stats = generate_with_cache(duckdb_con, gen, histories, k=5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpl_platform.pseudo_labels.anchors.base import ANCHOR_COLUMNS, AnchorGenerator, AnchorResult, UserHistory
from gpl_platform.pseudo_labels.anchors.history import HistoryAnchorGenerator
from gpl_platform.pseudo_labels.anchors.parser import ParseResult, parse_anchors

__all__ = [
    "ANCHOR_COLUMNS",
    "AnchorGenerator",
    "AnchorResult",
    "HistoryAnchorGenerator",
    "OpenAICompatibleAnchorGenerator",
    "ParseResult",
    "SmolLMAnchorGenerator",
    "UserHistory",
    "BACKENDS",
    "make_anchor_generator",
    "parse_anchors",
]


def _smollm(**kw: Any) -> AnchorGenerator:
    from gpl_platform.pseudo_labels.anchors.smollm import (
        SmolLMAnchorGenerator,  # heavy import (torch, transformers): lazy
    )

    return SmolLMAnchorGenerator(**kw)


def _openai(**kw: Any) -> AnchorGenerator:
    from gpl_platform.pseudo_labels.anchors.openai_backend import OpenAICompatibleAnchorGenerator

    return OpenAICompatibleAnchorGenerator(**kw)


def _history(**kw: Any) -> AnchorGenerator:
    return HistoryAnchorGenerator(**kw)


def _sid(**kw: Any) -> AnchorGenerator:
    from gpl_platform.pseudo_labels.anchors.semantic_id_backend import SidAnchorGenerator  # torch: lazy

    return SidAnchorGenerator(**kw)


BACKENDS: dict[str, Callable[..., AnchorGenerator]] = {
    "smollm": _smollm,
    "openai": _openai,
    "history": _history,
    "sid": _sid,
}


def make_anchor_generator(backend: str, **kwargs: Any) -> AnchorGenerator:
    """Build an anchor generator by backend name ("smollm", "openai", "history", "sid")."""
    try:
        factory = BACKENDS[backend.lower()]
    except KeyError:
        raise ValueError(f"unknown anchor backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(**kwargs)


def __getattr__(name: str) -> Any:  # lazy access to the heavy backends
    if name == "SmolLMAnchorGenerator":
        from gpl_platform.pseudo_labels.anchors.smollm import SmolLMAnchorGenerator

        return SmolLMAnchorGenerator
    if name == "OpenAICompatibleAnchorGenerator":
        from gpl_platform.pseudo_labels.anchors.openai_backend import OpenAICompatibleAnchorGenerator

        return OpenAICompatibleAnchorGenerator
    raise AttributeError(name)
