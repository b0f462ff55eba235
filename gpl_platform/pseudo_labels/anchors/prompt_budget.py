"""Token caps on what a prompt may hold.

A history item's text comes from the catalog, and the catalog is user data: one 1 MB title would go
into the prompt whole, and an in-process model then allocates hundreds of MB per layer for it (the
whole batch falls back). Every LLM backend therefore renders its history block through
:func:`bounded_history_block`: each item line is cut to ``max_item_tokens`` tokens, then the oldest
items are dropped (and, as a last resort, the block is cut) until the whole prompt fits in
``max_prompt_tokens``. Each cut is counted in the generator's stats:

* ``prompt_item_truncated``: item lines cut to ``max_item_tokens``;
* ``prompt_items_dropped``: oldest items left out so that the prompt fits;
* ``prompt_block_truncated``: users whose block still had to be cut to fit;
* ``prompt_capped_users``: users whose prompt was changed by any of the above.

Tokens are the backend's own where it has a tokenizer (SmolLM2); a remote server's tokenizer is not
known here, so the OpenAI-compatible backend counts with :class:`ApproxTokenizer` (4 characters a
token, the usual rule of thumb for English BPE vocabularies).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpl_platform.pseudo_labels.anchors.base import UserHistory, compact_item_text, main_genres

#: characters of an item text kept before tokenizing (no token of these vocabularies is this long),
#: so that a pathological text is never tokenized whole
_CHARS_PER_TOKEN_BOUND = 16


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class PromptBudget:
    """Token caps of a prompt (``anchors.max_item_tokens`` and ``anchors.max_prompt_tokens``)."""

    max_item_tokens: int = 48
    max_prompt_tokens: int = 768

    def __post_init__(self) -> None:
        if self.max_item_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError(f"prompt caps must be >= 1, got {self}")

    def as_params(self) -> dict[str, int]:
        """The caps as generator parameters (they change the prompt, so they enter the cache signature)."""
        return {"max_item_tokens": self.max_item_tokens, "max_prompt_tokens": self.max_prompt_tokens}


class ApproxTokenizer:
    """Stand-in tokenizer for servers whose vocabulary is unknown: one token per 4 characters."""

    chars_per_token = 4

    def encode(self, text: str) -> list[int]:
        n = self.chars_per_token
        return [len(text[i : i + n]) for i in range(0, len(text), n)]

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - not used: cutting goes by characters
        raise NotImplementedError


class HFTokenizer:
    """A transformers tokenizer seen through :class:`TokenizerLike` (no special tokens added)."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _cut(text: str, max_tokens: int, tokenizer: TokenizerLike) -> tuple[str, int, bool]:
    """``text`` cut to at most ``max_tokens`` tokens: (text, its token count, whether it was cut)."""
    bound = max_tokens * _CHARS_PER_TOKEN_BOUND
    clipped = len(text) > bound
    if clipped:
        text = text[:bound]
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text, len(ids), clipped
    if isinstance(tokenizer, ApproxTokenizer):
        return text[: max_tokens * tokenizer.chars_per_token], max_tokens, True
    cut = tokenizer.decode(ids[:max_tokens]).rstrip()
    return cut, len(tokenizer.encode(cut)), True


def bounded_history_block(
    history: UserHistory,
    max_items: int,
    budget: PromptBudget,
    tokenizer: TokenizerLike,
    fixed_tokens: int,
    stats: Counter | None = None,
    genre_summary: bool = False,
) -> str:
    """The prompt block of a history (one compact item line per item, most recent first, and a
    "Main genres:" line with ``genre_summary``) within ``budget``; ``fixed_tokens`` is what the rest
    of the prompt costs. The same history always gives the same block."""
    stats = stats if stats is not None else Counter()
    capped = False
    lines: list[tuple[str, int]] = []
    for text in history.item_texts[:max_items]:
        line, n, was_cut = _cut(compact_item_text(text), budget.max_item_tokens, tokenizer)
        if was_cut:
            stats["prompt_item_truncated"] += 1
            capped = True
        lines.append((line, n))
    summary: tuple[str, int] | None = None
    if genre_summary:
        top = main_genres(history.item_texts)
        if top:
            text, n, was_cut = _cut("Main genres: " + ", ".join(top), budget.max_item_tokens, tokenizer)
            capped |= was_cut
            summary = (text, n)
    room = budget.max_prompt_tokens - fixed_tokens

    def size() -> int:  # tokens of the block (one newline token between lines)
        parts = lines + ([summary] if summary else [])
        return sum(n for _, n in parts) + max(0, len(parts) - 1)

    while len(lines) > 1 and size() > room:
        lines.pop()  # the oldest item goes first
        stats["prompt_items_dropped"] += 1
        capped = True
    block = "\n".join(text for text, _ in lines + ([summary] if summary else []))
    if size() > room:
        block, _, _ = _cut(block, max(1, room), tokenizer)
        stats["prompt_block_truncated"] += 1
        capped = True
    if capped:
        stats["prompt_capped_users"] += 1
    return block
