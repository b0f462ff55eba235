"""Token caps of prompts (gpl_platform/pseudo_labels/anchors/prompt_budget.py), with a real tokenizer-like counter."""

from __future__ import annotations

from collections import Counter

import pytest

from gpl_platform.pseudo_labels.anchors import UserHistory
from gpl_platform.pseudo_labels.anchors.base import format_history
from gpl_platform.pseudo_labels.anchors.prompt_budget import ApproxTokenizer, PromptBudget, bounded_history_block


class WordTokenizer:
    """One token per whitespace-separated word (keeps the counting easy to check by hand)."""

    def encode(self, text):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


TEXTS = (
    "Star Wars (1977). Genres: Action, Adventure, Sci-Fi",
    "Fargo (1996). Genres: Crime, Drama",
    "Alien (1979). Genres: Horror, Sci-Fi",
    "Heat (1995). Genres: Action, Crime",
)
HIST = UserHistory("u", ("1", "2", "3", "4"), TEXTS)


def test_within_budget_the_block_is_the_plain_history_block():
    stats = Counter()
    block = bounded_history_block(HIST, 6, PromptBudget(48, 768), WordTokenizer(), 300, stats, genre_summary=True)
    assert block == format_history(HIST, 6, genre_summary=True)
    assert not stats


def test_long_item_is_cut_to_max_item_tokens_and_counted():
    hist = UserHistory("u", ("1", "2"), ("word " * 500 + "(1990). Genres: Drama", TEXTS[1]))
    stats = Counter()
    block = bounded_history_block(hist, 6, PromptBudget(10, 768), WordTokenizer(), 0, stats)
    first, second = block.split("\n")
    assert len(first.split()) == 10 and second == "Fargo: Crime, Drama"
    assert stats == Counter(prompt_item_truncated=1, prompt_capped_users=1)


def test_a_megabyte_item_is_never_tokenized_whole():
    seen = []

    class Recording(WordTokenizer):
        def encode(self, text):
            seen.append(len(text))
            return super().encode(text)

    hist = UserHistory("u", ("1",), ("x" * 1_000_000,))
    stats = Counter()
    block = bounded_history_block(hist, 6, PromptBudget(8, 768), Recording(), 0, stats)
    assert max(seen) <= 8 * 16 and len(block) <= 8 * 16
    assert stats["prompt_item_truncated"] == 1


def test_whole_prompt_cap_drops_oldest_items_first():
    stats = Counter()
    # each compact line is 4-5 words; fixed part 10, cap 20 -> room 10 tokens
    block = bounded_history_block(HIST, 6, PromptBudget(48, 20), WordTokenizer(), 10, stats)
    assert block.split("\n") == ["Star Wars: Action, Adventure, Sci-Fi", "Fargo: Crime, Drama"]
    assert stats["prompt_items_dropped"] == 2 and stats["prompt_capped_users"] == 1


def test_block_cut_when_even_one_item_does_not_fit():
    stats = Counter()
    block = bounded_history_block(HIST, 6, PromptBudget(48, 13), WordTokenizer(), 10, stats)
    assert len(block.split()) == 3
    assert stats["prompt_block_truncated"] == 1 and stats["prompt_items_dropped"] == 3


def test_approx_tokenizer_counts_four_characters_a_token():
    stats = Counter()
    hist = UserHistory("u", ("1",), ("y" * 400,))
    block = bounded_history_block(hist, 6, PromptBudget(25, 768), ApproxTokenizer(), 0, stats)
    assert block == "y" * 100 and stats["prompt_item_truncated"] == 1


def test_bad_caps_are_refused():
    with pytest.raises(ValueError, match="prompt caps"):
        PromptBudget(0, 10)
