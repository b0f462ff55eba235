"""Core types of the interest-anchor library.

An *interest anchor* is a short text describing what a user wants next, generated once per user
from the user's positive history (docs/METHOD.md, step 1). Every backend returns the same
:class:`AnchorResult` shape so that downstream code (embedding, pseudo-labels, confidence weights)
does not care which generator made the anchors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ANCHOR_COLUMNS: tuple[str, ...] = (
    "user_id",
    "anchor_rank",
    "anchor_text",
    "logprob",
    "gen_prob",
    "is_fallback",
    "fallback_reason",
)

#: Anchor text used for a user with an empty history (nothing to condition on).
GENERIC_ANCHOR_TEXT = "popular highly rated movies"

# fallback reasons (values of ``fallback_reason`` and suffixes of ``stats`` keys)
FALLBACK_EMPTY_HISTORY = "empty_history"
FALLBACK_NO_USABLE_OUTPUT = "no_usable_output"
FALLBACK_GENERATION_ERROR = "generation_error"
FALLBACK_PAD = "pad_with_history"
#: a day-bound generator (``sid``) with no model yet serves history anchors: its warm-up before the first refit
FALLBACK_NO_SID_MODEL = "no_sid_model"


@dataclass(frozen=True)
class UserHistory:
    """A user's positive history, most recent first.

    ``item_texts`` are the catalog texts of the items, e.g.
    ``"Toy Story (1995). Genres: Animation, Children's, Comedy"``.
    """

    user_id: str
    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.item_texts):
            raise ValueError(f"user {self.user_id!r}: {len(self.item_ids)} item ids but {len(self.item_texts)} texts")


@dataclass
class AnchorResult:
    """Anchors of a set of users plus counters describing how they were made."""

    anchors: pd.DataFrame
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class RawAnchor:
    """One anchor as produced by a backend before it is framed (internal)."""

    text: str
    logprob: float = 0.0
    is_fallback: bool = False
    fallback_reason: str | None = None


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (keys sorted, so dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def frame_from_rows(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build a frame with exactly :data:`ANCHOR_COLUMNS` and the documented dtypes."""
    df = pd.DataFrame(list(rows), columns=list(ANCHOR_COLUMNS))
    df["user_id"] = df["user_id"].astype(str) if len(df) else df["user_id"].astype(object)
    df["anchor_rank"] = df["anchor_rank"].astype("int64")
    df["anchor_text"] = df["anchor_text"].astype(object)
    df["logprob"] = df["logprob"].astype("float64")
    df["gen_prob"] = df["gen_prob"].astype("float64")
    df["is_fallback"] = df["is_fallback"].astype(bool)
    df["fallback_reason"] = df["fallback_reason"].astype(object).where(df["fallback_reason"].notna(), None)
    return df.reset_index(drop=True)


def history_anchor_texts(history: UserHistory, k: int) -> list[str]:
    """The user's k most recent distinct item texts (used by the history backend and fallbacks)."""
    out: list[str] = []
    seen: set[str] = set()
    for text in history.item_texts:
        t = " ".join(str(text).split())
        if not t or t.lower() in seen:
            continue
        seen.add(t.lower())
        out.append(t)
        if len(out) >= k:
            break
    return out


def compact_item_text(text: str, keep_year: bool = False) -> str:
    """``"Toy Story (1995). Genres: Animation, Comedy"`` -> ``"Toy Story: Animation, Comedy"``.

    Years are dropped by default: the SmolLM2 tokenizer spends one token per digit, so
    "(1995)" costs 6 prompt tokens per item for little signal.
    """
    t = " ".join(str(text).split())
    t = re.sub(r"\.\s*Genres?\s*:\s*", ": ", t, flags=re.I)
    if not keep_year:
        t = re.sub(r"\s*\(\d{4}\)", "", t)
    return t.replace("|", ", ")


def main_genres(texts: Sequence[str], n: int = 3) -> list[str]:
    """Most frequent genres of catalog texts of the form "... Genres: A, B" (ties: first seen)."""
    counts: dict[str, int] = {}
    for t in texts:
        m = re.search(r"Genres?\s*:\s*(.+)$", str(t), flags=re.I)
        if not m:
            continue
        for g in re.split(r"[,|]", m.group(1)):
            g = g.strip().rstrip(".")
            if g:
                counts[g] = counts.get(g, 0) + 1
    return [g for g, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def format_history(history: UserHistory, max_items: int, keep_year: bool = False, genre_summary: bool = False) -> str:
    """Prompt block of a history: one compact item text per line, most recent first.

    With ``genre_summary`` a last line "Main genres: A, B, C" (over the whole history) is added
    when the texts carry genres.
    """
    lines = [compact_item_text(t, keep_year) for t in history.item_texts[:max_items]]
    if genre_summary:
        top = main_genres(history.item_texts)
        if top:
            lines.append("Main genres: " + ", ".join(top))
    return "\n".join(lines)


class AnchorGenerator(ABC):
    """Interface of every anchor backend.

    Subclasses set ``backend``, ``model_id``, ``prompt_version`` and ``params`` (only the
    parameters that change the output: they enter :meth:`cache_signature`), and implement
    :meth:`_generate_raw`, which returns for each user a list of candidate anchors (possibly
    empty). The base class enforces the contract: every user ends with 1..k anchors, falling back
    to the user's own history (or a generic anchor when the history is empty), and counts it.
    """

    backend: str = "abstract"
    model_id: str = ""
    prompt_version: str = ""
    params: dict[str, Any]

    #: whether non-fallback anchors come from a language model (counted as ``llm_anchors``)
    is_llm: bool = True

    #: fill users with fewer than k LLM anchors up to k with their history items (marked fallback)
    pad_with_history: bool = False

    #: tokens of one anchor when ``gen_prob`` is a whole-sequence probability of fixed length (the
    #: confidence factor then uses the per-token geometric mean); None: use ``gen_prob`` as it is
    tokens_per_anchor: int | None = None

    def for_day(self, day) -> AnchorGenerator:
        """The generator that serves ``day``. Backends whose model is retrained over time (``sid``) return
        the model trained on data before the day; the others are the same on every day."""
        return self

    def lineage_signature(self) -> str:
        """What identifies this generator across days (stored as ``anchor_signature`` and keyed into
        calibrations): for day-bound backends the family, without the per-day model version."""
        return self.cache_signature()

    def anchor_vectors(self, texts: Sequence[str], encoder) -> np.ndarray:
        """Vectors of anchors in the frozen encoder's space: text anchors are encoded (each distinct
        text once); backends whose anchors name catalog entries override this."""
        from gpl_platform.pseudo_labels.encoder import encode_deduplicated

        return encode_deduplicated(encoder, list(texts))

    def cache_signature(self) -> str:
        """Stable hash of everything that changes the anchors: backend, model, prompt, params."""
        return stable_hash(
            {
                "backend": self.backend,
                "model_id": self.model_id,
                "prompt_version": self.prompt_version,
                "params": getattr(self, "params", {}),
                "pad_with_history": self.pad_with_history,
            },
            n=32,
        )

    @abstractmethod
    def _generate_raw(
        self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter
    ) -> list[list[RawAnchor]]:
        """Return one list of anchors per history (same order); may be empty or longer than k."""

    def generate(self, histories: Sequence[UserHistory], k: int, progress: bool = True) -> AnchorResult:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        histories = list(histories)
        stats: Counter = Counter()
        stats["users"] = len(histories)
        # users with an empty history never reach the model
        todo_idx = [i for i, h in enumerate(histories) if len(h.item_texts) > 0]
        raw_by_idx: dict[int, list[RawAnchor]] = {}
        if todo_idx:
            raw = self._generate_raw([histories[i] for i in todo_idx], k, progress, stats)
            if len(raw) != len(todo_idx):
                raise RuntimeError(f"{type(self).__name__} returned {len(raw)} anchor lists for {len(todo_idx)} users")
            raw_by_idx = dict(zip(todo_idx, raw))

        rows: list[dict[str, Any]] = []
        for i, hist in enumerate(histories):
            anchors = self._finalize_user(hist, raw_by_idx.get(i), k, stats)
            for rank, a in enumerate(anchors):
                lp = float(a.logprob)
                if not np.isfinite(lp) or lp > 0:
                    lp = 0.0
                rows.append(
                    {
                        "user_id": str(hist.user_id),
                        "anchor_rank": rank,
                        "anchor_text": a.text,
                        "logprob": lp,
                        "gen_prob": float(np.exp(lp)),
                        "is_fallback": bool(a.is_fallback),
                        "fallback_reason": a.fallback_reason,
                    }
                )
        df = frame_from_rows(rows)
        n_empty = stats.get(f"fallback_{FALLBACK_EMPTY_HISTORY}", 0)
        if n_empty:  # one line per call, not one per user (the users are at DEBUG)
            logger.info("%s: %d users with an empty history: generic anchors", self.backend, n_empty)
        n_fb_users = stats.get("fallback_users", 0)
        if n_fb_users:
            logger.warning(
                "%s: %d of %d users fell back to non-LLM anchors (%s)",
                self.backend,
                n_fb_users,
                len(histories),
                {k_: v for k_, v in stats.items() if k_.startswith("fallback_")},
            )
        logger.debug("%s: %d anchors for %d users, stats=%s", self.backend, len(df), len(histories), dict(stats))
        return AnchorResult(anchors=df, stats={k_: int(v) for k_, v in stats.items()})

    # ------------------------------------------------------------------ helpers
    def _finalize_user(self, hist: UserHistory, raw: list[RawAnchor] | None, k: int, stats: Counter) -> list[RawAnchor]:
        if not hist.item_texts:
            stats["fallback_users"] += 1
            stats[f"fallback_{FALLBACK_EMPTY_HISTORY}"] += 1
            logger.debug("user %s has an empty history: generic anchor", hist.user_id)  # counted in generate()
            return [RawAnchor(GENERIC_ANCHOR_TEXT, 0.0, True, FALLBACK_EMPTY_HISTORY)]

        kept: list[RawAnchor] = []
        seen: set[str] = set()
        for a in raw or []:
            text = " ".join(str(a.text).split())
            key = text.lower()
            if not text or key in seen:
                continue
            seen.add(key)
            kept.append(RawAnchor(text, a.logprob, a.is_fallback, a.fallback_reason))
            if len(kept) >= k:
                break
        n_model = sum(1 for a in kept if not a.is_fallback)
        if self.is_llm:
            stats["llm_anchors"] += n_model

        if not kept:
            reason = FALLBACK_NO_USABLE_OUTPUT
            if raw is None:
                reason = FALLBACK_GENERATION_ERROR
            stats["fallback_users"] += 1
            stats[f"fallback_{reason}"] += 1
            logger.debug("user %s: no usable anchor (%s), falling back to history", hist.user_id, reason)
            return [RawAnchor(t, 0.0, True, reason) for t in history_anchor_texts(hist, k)] or [
                RawAnchor(GENERIC_ANCHOR_TEXT, 0.0, True, reason)
            ]

        if self.pad_with_history and len(kept) < k:
            for t in history_anchor_texts(hist, k):
                if len(kept) >= k:
                    break
                if t.lower() in seen:
                    continue
                seen.add(t.lower())
                kept.append(RawAnchor(t, 0.0, True, FALLBACK_PAD))
                stats[f"fallback_{FALLBACK_PAD}_anchors"] += 1
        return kept

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"{type(self).__name__}(backend={self.backend!r}, model_id={self.model_id!r}, "
            f"prompt_version={self.prompt_version!r}, params={getattr(self, 'params', {})!r})"
        )
