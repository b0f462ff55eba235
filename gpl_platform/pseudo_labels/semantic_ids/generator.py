"""A generator of semantic IDs: a small decoder-only transformer over the code sequences of users'
positives, and a prefix-constrained beam search that only emits valid IDs. Its training (from
scratch, on those sequences) is in :mod:`gpl_platform.pseudo_labels.semantic_ids.generator_training`.

Token layout: ``PAD = 0``, ``BOS = 1``, then one block of tokens per ID position (L code levels and
the collision suffix), so that "code 3 at level 1" and "code 3 at level 2" are different tokens.
A history of items [i1, i2, ...] (oldest first) is ``BOS c1(i1) .. cL(i1) s(i1) c1(i2) ...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gpl_platform.anchor_settings import SidGeneratorConfig

PAD, BOS, N_SPECIAL = 0, 1, 2


class SidVocabulary:
    """Maps item IDs (rows of ``codes``, shape (n_items, positions)) to tokens and back, and knows
    which token may follow each valid prefix (the trie of the catalog's IDs)."""

    def __init__(self, item_ids: Sequence[str], codes: np.ndarray):
        self.item_ids = [str(i) for i in item_ids]
        self.codes = np.asarray(codes, dtype=np.int64)
        if self.codes.ndim != 2 or len(self.codes) != len(self.item_ids):
            raise ValueError(f"codes must be (n_items={len(self.item_ids)}, positions), got {self.codes.shape}")
        if len({tuple(c) for c in self.codes}) != len(self.codes):
            raise ValueError("semantic IDs are not unique: every item needs its own full code tuple")
        self.positions = self.codes.shape[1]
        self.sizes = [int(self.codes[:, p].max()) + 1 for p in range(self.positions)]
        self.offsets = np.concatenate([[N_SPECIAL], N_SPECIAL + np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.size = int(N_SPECIAL + sum(self.sizes))
        self.tokens = self.codes + self.offsets[None, :]  # (n_items, positions)
        self.item_index = {item: k for k, item in enumerate(self.item_ids)}
        # the full code tuple -> item row
        self._row_of = {tuple(row): k for k, row in enumerate(self.codes)}
        # The trie as tensors for the vectorized search: at position p, node j (a prefix of length p)
        # allows code c when child_mask[p][j, c]; child_node[p][j, c] is the node of the longer prefix
        # (at the last position: the item row), -1 when not allowed.
        self.child_mask: list[torch.Tensor] = []
        self.child_node: list[torch.Tensor] = []
        node_of_prefix = {(): 0}
        for p in range(self.positions):
            nodes = np.full((len(node_of_prefix), self.sizes[p]), -1, dtype=np.int64)
            next_nodes: dict[tuple, int] = {}
            for k_, row in enumerate(self.codes):
                prefix, longer = tuple(row[:p]), tuple(row[: p + 1])
                if p == self.positions - 1:
                    target = k_
                else:
                    target = next_nodes.setdefault(longer, len(next_nodes))
                nodes[node_of_prefix[prefix], row[p]] = target
            self.child_node.append(torch.from_numpy(nodes))
            self.child_mask.append(torch.from_numpy(nodes >= 0))
            node_of_prefix = next_nodes

    def item_of(self, full_codes: tuple) -> int:
        return self._row_of.get(tuple(full_codes), -1)

    def sequence(self, item_rows: Sequence[int]) -> np.ndarray:
        """BOS followed by the tokens of the items (oldest first)."""
        body = self.tokens[np.asarray(item_rows, dtype=np.int64)].reshape(-1) if len(item_rows) else np.empty(0, int)
        return np.concatenate([[BOS], body]).astype(np.int64)


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention and an optional key/value cache."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # decoding one token after a cached prefix: it may see everything before it
            if t != 1:
                raise ValueError("cached decoding takes one token at a time")
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=cache is None and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + F.dropout(self.out(attn.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
        return x + self.ff(self.norm2(x)), (k, v)


class SidTransformer(nn.Module):
    """Decoder-only transformer over ID tokens (learned positions, tied input/output embeddings)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([_Block(d_model, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        # small init: with N(0, 1) embeddings the tied head starts with logits of magnitude sqrt(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: list | None = None,
        start: int = 0,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        """Logits (batch, time, vocab) and the per-layer key/value cache. Without ``attn_mask``: causal
        attention over right-padded rows (a PAD never precedes a real token, so it stays out of every
        real position's context). With it (batch, 1, time, time; True = may attend) and ``positions``
        (batch, time): packed rows, see
        :func:`gpl_platform.pseudo_labels.semantic_ids.generator_training.packed_batch`."""
        length = tokens.shape[1]
        if positions is None:
            positions = torch.arange(start, start + length)[None]
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's {self.max_len} positions")
        h = self.tok(tokens) + self.pos(positions)
        new_cache = []
        for layer, block in enumerate(self.blocks):
            h, kv = block(h, None if cache is None else cache[layer], attn_mask)
            new_cache.append(kv)
        return self.norm(h) @ self.tok.weight.T, new_cache


@dataclass
class TrainedSidGenerator:
    model: SidTransformer
    vocab: SidVocabulary
    config: SidGeneratorConfig
    metrics: dict
    version: str


def max_tokens(cfg: SidGeneratorConfig, positions: int) -> int:
    return 1 + (cfg.max_history_items + 1) * positions


def beam_search(
    model: SidTransformer,
    vocab: SidVocabulary,
    prompts: Sequence[np.ndarray],
    k: int,
    beam_size: int,
    exclude: Sequence[set[int]] | None = None,
    batch_users: int = 256,
) -> list[list[tuple[int, float]]]:
    """Top-k items per prompt (rows of item indices, oldest first) as (item row, sequence log-prob).

    Hierarchical search: position p only expands to the codes the catalog's trie allows after the
    beam's prefix, so every finished beam is a valid ID of exactly one item. Log-probabilities are
    the model's own (softmax over the whole vocabulary), summed over the ID's tokens. ``exclude``
    holds, per prompt, item rows never to return (e.g. the history), removed at the last position.
    Prompts of equal length are decoded together, so the prompt runs once and beams reuse its cache.
    """
    beam_size = max(beam_size, k)
    results: list[list[tuple[int, float]] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for r, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(r)
    model.eval()
    with torch.no_grad():
        for rows in by_length.values():
            for start in range(0, len(rows), batch_users):
                chunk = rows[start : start + batch_users]
                banned = np.zeros((len(chunk), len(vocab.item_ids)), dtype=bool)
                for j, r in enumerate(chunk):
                    if exclude is not None and exclude[r]:
                        banned[j, list(exclude[r])] = True
                found = _beam_chunk(
                    model, vocab, np.stack([vocab.sequence(prompts[r]) for r in chunk]), banned, k, beam_size
                )
                for r, items in zip(chunk, found):
                    results[r] = items
    return results  # type: ignore[return-value]


def _beam_chunk(
    model: SidTransformer, vocab: SidVocabulary, tokens: np.ndarray, banned: np.ndarray, k: int, beam_size: int
) -> list[list[tuple[int, float]]]:
    n_users, length = tokens.shape
    logits, cache = model(torch.from_numpy(tokens))
    logp = torch.log_softmax(logits[:, -1], -1)  # (rows, vocab); a row is one beam of one user
    state = torch.zeros(n_users, 1, dtype=torch.long)  # per user and beam: trie node (prefix id)
    score = torch.zeros(n_users, 1)
    for position in range(vocab.positions):
        size, offset = vocab.sizes[position], int(vocab.offsets[position])
        beams = state.shape[1]
        step = logp[:, offset : offset + size].reshape(n_users, beams, size) + score[..., None]
        nodes = state.clamp(min=0)
        allowed = vocab.child_mask[position][nodes] & (state >= 0)[..., None]
        if position == vocab.positions - 1:  # the suffix names an item: drop the excluded ones
            item = vocab.child_node[position][nodes]
            allowed &= ~torch.from_numpy(banned)[torch.arange(n_users)[:, None, None], item.clamp(min=0)]
        step = step.masked_fill(~allowed, float("-inf")).reshape(n_users, beams * size)
        width = min(beam_size, beams * size)
        score, flat = step.topk(width, dim=1)
        parent, code = flat // size, flat % size
        state = vocab.child_node[position][nodes.gather(1, parent), code]
        state = state.masked_fill(torch.isinf(score), -1)
        if position == vocab.positions - 1:
            break
        rows = (torch.arange(n_users)[:, None] * beams + parent).reshape(-1)  # parent row of each new beam
        cache = [(kk[rows], vv[rows]) for kk, vv in cache]
        step_tokens = (code + offset).reshape(-1, 1)
        logits, cache = model(step_tokens, cache, start=length + position)
        logp = torch.log_softmax(logits[:, -1], -1)
    out = []
    for u in range(n_users):
        keep = torch.isfinite(score[u])
        out.append([(int(i), float(s)) for i, s in zip(state[u][keep][:k], score[u][keep][:k])])
    return out
