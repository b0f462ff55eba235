"""A generator of semantic IDs: a small decoder-only transformer trained from scratch on the code
sequences of users' positives, and a prefix-constrained beam search that only emits valid IDs.

Token layout: ``PAD = 0``, ``BOS = 1``, then one block of tokens per ID position (L code levels and
the collision suffix), so that "code 3 at level 1" and "code 3 at level 2" are different tokens.
A history of items [i1, i2, ...] (oldest first) is ``BOS c1(i1) .. cL(i1) s(i1) c1(i2) ...``.

Two training objectives (``SidGeneratorConfig.objective``):

- ``next_day`` (default): the prompt is a user's positives of the days before day d, the targets are
  the positives of day d; each target is scored as if it alone followed the prompt. This is what the
  anchors are used for: the IDs a user will want on a later day.
- ``next_item``: next-token prediction over the whole sequence (each ID from the ones before it,
  mostly from the same rating session).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gpl_platform.anchor_settings import SidGeneratorConfig
from gpl_platform.pseudo_labels.semantic_ids.rqvae import deterministic_torch

log = logging.getLogger(__name__)
PAD, BOS, N_SPECIAL = 0, 1, 2
TARGETS_PER_ROW = 16  # a day with more targets spans several packed rows (bounds a row's length)


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
        (batch, time): packed rows, see :func:`packed_batch`."""
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


def keep_probabilities(sequences: Sequence[Sequence[int]], n_items: int, t: float) -> np.ndarray:
    """Per item: probability to keep one of its occurrences in a training history, min(1, sqrt(t / f_i))
    with f_i the item's share of all positives (word2vec-style down-sampling of popular items)."""
    counts = np.bincount(
        np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.empty(0, np.int64),
        minlength=n_items,
    ).astype(float)
    if t <= 0 or counts.sum() == 0:
        return np.ones(n_items)
    share = counts / counts.sum()
    with np.errstate(divide="ignore"):
        return np.where(share > 0, np.minimum(1.0, np.sqrt(t / np.maximum(share, 1e-300))), 1.0)


@dataclass
class TrainingExample:
    """A prompt (item rows, oldest first: every earlier positive of the user, so also what the search
    must not return) and the items to predict from it. ``next_item`` training examples have no
    targets: every ID of the prompt is predicted from the ones before it."""

    prompt: np.ndarray
    targets: np.ndarray


def day_examples(rows: np.ndarray, days: np.ndarray) -> list[TrainingExample]:
    """``next_day`` examples of one user (item rows and their days, ascending): for every day after the
    user's first, the positives before it and the positives of that day."""
    return [TrainingExample(rows[days < d], rows[days == d]) for d in np.unique(days)[1:]]


def count_training_targets(days: Sequence[Sequence[int]], objective: str) -> int:
    """How many positives the objective learns to predict: all of them (``next_item``), or those on a day
    after the user's first (``next_day``)."""
    if objective == "next_item":
        return int(sum(len(d) for d in days))
    return int(sum(np.sum(np.asarray(d) > min(d)) for d in days if len(d)))


def _rows_of(example: TrainingExample, targets_per_row: int) -> int:
    return max(1, -(-len(example.targets) // targets_per_row))


def _epoch_rows(
    examples: list[TrainingExample],
    keep: np.ndarray,
    cfg: SidGeneratorConfig,
    rng: np.random.Generator,
    targets_per_row: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch's (prompt, targets) rows: popular items thinned out of the prompts (each epoch anew; the
    last item always stays), the prompt cut to its last max_history_items; ``next_item`` prompts are a
    random window of max_history_items + 1 items; a day with many targets spans several rows."""
    out = []
    for ex in examples:
        prompt = ex.prompt
        mask = rng.random(len(prompt)) < keep[prompt]
        mask[-1] = True
        prompt = prompt[mask]
        if len(ex.targets) == 0:
            span = cfg.max_history_items + 1
            if len(prompt) > span:
                begin = rng.integers(0, len(prompt) - span + 1)
                prompt = prompt[begin : begin + span]
            out.append((prompt, ex.targets))
            continue
        prompt = prompt[-cfg.max_history_items :]
        for begin in range(0, len(ex.targets), targets_per_row):
            out.append((prompt, ex.targets[begin : begin + targets_per_row]))
    return out


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (rows, width)
    positions: torch.Tensor  # (rows, width)
    attn_mask: torch.Tensor  # (rows, 1, width, width), True = may attend
    labels: torch.Tensor  # (rows, width): the next token at each position, -100 where nothing is predicted
    target_row: torch.Tensor  # (targets,) the row of each target
    prompt_end: torch.Tensor  # (targets,) the column of its row's last prompt token, which predicts its first token
    first_token: torch.Tensor  # (targets,) the target's first token
    target_columns: torch.Tensor  # (targets, positions - 1): the columns holding the target's other tokens


def packed_batch(vocab: SidVocabulary, rows: Sequence[tuple[np.ndarray, np.ndarray]], lm_prompt: bool) -> PackedBatch:
    """Rows of ``BOS + prompt``, then one block per target with its first ``positions - 1`` tokens.

    A block attends to the prompt and to itself, never to another block, and its position ids continue
    the prompt's, so every target is scored as if it alone followed the prompt; the prompt's last
    position predicts every target's first token. The prompt runs once for all of a day's targets.
    ``lm_prompt`` also predicts each prompt token from the ones before it (the ``next_item`` loss)."""
    span = vocab.positions
    seqs = [vocab.sequence(p) for p, _ in rows]
    width = max(len(s) + (span - 1) * len(t) for s, (_, t) in zip(seqs, rows))
    tokens = np.full((len(rows), width), PAD, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segment = np.full((len(rows), width), -1, dtype=np.int64)  # 0 prompt, j + 1 the j-th target, -1 padding
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    target_row, prompt_end, first_tokens, target_cols = [], [], [], []
    for r, (seq, (_, targets)) in enumerate(zip(seqs, rows)):
        n = len(seq)
        tokens[r, :n], positions[r, :n], segment[r, :n] = seq, np.arange(n), 0
        if lm_prompt:
            labels[r, : n - 1] = seq[1:]
        for j, item in enumerate(targets):
            item_tokens = vocab.tokens[item]
            cols = np.arange(n + j * (span - 1), n + (j + 1) * (span - 1))
            tokens[r, cols], positions[r, cols], segment[r, cols] = item_tokens[:-1], np.arange(n, n + span - 1), j + 1
            labels[r, cols] = item_tokens[1:]
            target_row.append(r)
            prompt_end.append(n - 1)
            first_tokens.append(item_tokens[0])
            target_cols.append(cols)
    seg = torch.from_numpy(segment)
    col = torch.arange(width)
    # causal, and a key in a block is visible only from its own block (padding sees prompt and padding)
    mask = (col[None, None, :] <= col[None, :, None]) & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    return PackedBatch(
        torch.from_numpy(tokens),
        torch.from_numpy(positions),
        mask[:, None],
        torch.from_numpy(labels),
        *(torch.tensor(v, dtype=torch.long) for v in (target_row, prompt_end, first_tokens)),
        torch.from_numpy(np.array(target_cols, dtype=np.int64).reshape(len(target_row), span - 1)),
    )


def packed_log_probs(model: SidTransformer, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the labelled tokens (rows, width), 0 where unlabelled; log P of each target's
    first token)."""
    logp = torch.log_softmax(model(batch.tokens, positions=batch.positions, attn_mask=batch.attn_mask)[0], -1)
    labelled = batch.labels >= 0
    token_logp = logp.gather(2, batch.labels.clamp(min=0)[..., None])[..., 0] * labelled
    first = logp[batch.target_row, batch.prompt_end].gather(1, batch.first_token[:, None])[:, 0]
    return token_logp, first


def target_log_probs(model: SidTransformer, batch: PackedBatch) -> torch.Tensor:
    """log P(target ID | prompt) of every target of a packed batch (summed over the ID's tokens)."""
    token_logp, first = packed_log_probs(model, batch)
    return first + token_logp[batch.target_row[:, None], batch.target_columns].sum(1)


def train_sid_generator(
    vocab: SidVocabulary,
    user_sequences: Sequence[Sequence[str]],
    cfg: SidGeneratorConfig,
    seed: int,
    version: str,
    progress: bool = False,
    user_sessions: Sequence[Sequence[int]] | None = None,
    targets_per_row: int = TARGETS_PER_ROW,
) -> TrainedSidGenerator:
    """Train on users' positives (item ids, oldest first; ``user_sessions`` gives each positive's day,
    ascending, which ``next_day`` needs). A seeded tenth of the examples (``next_day``: user-days;
    ``next_item``: each user's last positive) is held out for the reported validation metrics.
    ``targets_per_row`` = 1 repeats the prompt for every target (the unpacked baseline of `gpl bench sid`)."""
    if targets_per_row < 1:
        raise ValueError(f"targets_per_row must be >= 1, got {targets_per_row}")
    with deterministic_torch():
        return _train_sid_generator(vocab, user_sequences, cfg, seed, version, progress, user_sessions, targets_per_row)


def _train_sid_generator(
    vocab: SidVocabulary,
    user_sequences: Sequence[Sequence[str]],
    cfg: SidGeneratorConfig,
    seed: int,
    version: str,
    progress: bool,
    user_sessions: Sequence[Sequence[int]] | None,
    targets_per_row: int,
) -> TrainedSidGenerator:
    from tqdm.auto import tqdm

    began = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if user_sessions is None:
        if cfg.objective == "next_day":
            raise ValueError("the next_day objective needs the day of every positive (user_sessions)")
        user_sessions = [[0] * len(s) for s in user_sequences]
    rows, sessions = [], []
    for seq, sess in zip(user_sequences, user_sessions):
        if len(seq) != len(sess):
            raise ValueError(f"a user has {len(seq)} positives but {len(sess)} days")
        known = [(vocab.item_index[i], d) for i, d in zip(seq, sess) if i in vocab.item_index]
        if known:
            order = sorted(range(len(known)), key=lambda n: known[n][1])  # stable: keeps the order within a day
            rows.append(np.array([known[n][0] for n in order], dtype=np.int64))
            sessions.append(np.array([known[n][1] for n in order], dtype=np.int64))
    unknown = sum(len(s) for s in user_sequences) - sum(len(r) for r in rows)
    if cfg.shuffle_within_day:  # once, before examples are cut (the order of one day's ratings is the site's)
        for n in range(len(rows)):
            order = np.lexsort((rng.random(len(rows[n])), sessions[n]))
            rows[n], sessions[n] = rows[n][order], sessions[n][order]
    train, valid = _split_examples(rows, sessions, cfg.objective, rng)
    if not train:
        raise ValueError(
            f"no training example for the {cfg.objective} objective: "
            + (
                "no user has positives on two days"
                if cfg.objective == "next_day"
                else "no training sequence has an item with a semantic ID"
            )
        )
    keep = keep_probabilities(rows, len(vocab.item_ids), cfg.popular_subsample_t)
    model = SidTransformer(
        vocab.size, max_tokens(cfg, vocab.positions), cfg.d_model, cfg.layers, cfg.heads, cfg.dropout
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = -(-sum(_rows_of(e, targets_per_row) for e in train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    lm_prompt = cfg.objective == "next_item"
    losses = []
    for _ in tqdm(range(cfg.epochs), desc="SID generator", disable=not progress):
        model.train()
        epoch = _epoch_rows(train, keep, cfg, rng, targets_per_row)
        order = rng.permutation(len(epoch))
        total, count = 0.0, 0
        for begin in range(0, len(order), cfg.batch_size):
            batch = packed_batch(vocab, [epoch[j] for j in order[begin : begin + cfg.batch_size]], lm_prompt)
            token_logp, first = packed_log_probs(model, batch)
            n = int((batch.labels >= 0).sum()) + len(first)
            loss = -(token_logp.sum() + first.sum()) / n
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + loss.item() * n, count + n
        losses.append(total / max(count, 1))
    model.eval()
    train_targets = np.concatenate([e.targets if len(e.targets) else e.prompt for e in train])
    metrics = {
        "objective": cfg.objective,
        "train_loss_per_token": losses,
        "final_train_loss": losses[-1],
        "users": len(rows),
        "positives": int(sum(len(r) for r in rows)),
        "training_examples": len(train),
        "training_targets": int(len(train_targets)),
        "unknown_items_skipped": int(unknown),
        "popular_keep_probability_min": float(keep.min()),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        **_validation_metrics(model, vocab, valid, cfg, np.bincount(train_targets, minlength=len(vocab.item_ids))),
    }
    metrics["seconds"] = round(time.perf_counter() - began, 1)
    log.info(
        "SID generator %s (%s): %d users, %d training targets, loss %.3f, valid nll/item %.3f, "
        "recall@10 %.3f (popularity %.3f) (%.1fs)",
        version,
        cfg.objective,
        metrics["users"],
        metrics["training_targets"],
        losses[-1],
        metrics["valid_nll_per_item"],
        metrics["valid_recall@10"],
        metrics.get("valid_popularity_recall@10", float("nan")),
        metrics["seconds"],
    )
    return TrainedSidGenerator(model, vocab, cfg, metrics, version)


def _split_examples(
    rows: list[np.ndarray], sessions: list[np.ndarray], objective: str, rng: np.random.Generator
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(training, held-out) examples. ``next_item``: each user's last positive is held out (users with one
    positive still teach the first step). ``next_day``: a seeded tenth of the user-days, when there are
    at least ten."""
    if objective == "next_item":
        train = [TrainingExample(r[:-1] if len(r) > 1 else r, np.empty(0, np.int64)) for r in rows]
        valid = [TrainingExample(r[:-1], r[-1:]) for r in rows if len(r) > 1]
        return train, valid
    if objective != "next_day":
        raise ValueError(f"unknown SID generator objective {objective!r}: 'next_day' or 'next_item'")
    examples = [e for r, d in zip(rows, sessions) for e in day_examples(r, d)]
    held = rng.random(len(examples)) < 0.1 if len(examples) >= 10 else np.zeros(len(examples), bool)
    return ([e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h])


def _validation_metrics(
    model: SidTransformer,
    vocab: SidVocabulary,
    valid: list[TrainingExample],
    cfg: SidGeneratorConfig,
    train_counts: np.ndarray,
) -> dict:
    """Held-out targets: NLL of their ID given the prompt, and the share of them in the top 10 of the
    constrained search (the user's earlier positives excluded), next to two baselines on the same
    examples: random, and the 10 most frequent training targets not among the user's positives."""
    if not valid:
        return {
            "valid_examples": 0,
            "valid_targets": 0,
            "valid_nll_per_item": float("nan"),
            "valid_recall@10": float("nan"),
        }
    rows = [(e.prompt[-cfg.max_history_items :], e.targets) for e in valid]
    with torch.no_grad():
        nll = -float(
            sum(
                target_log_probs(model, packed_batch(vocab, rows[b : b + 256], False)).sum()
                for b in range(0, len(rows), 256)
            )
        )
    exclude = [set(e.prompt.tolist()) for e in valid]
    found = beam_search(model, vocab, [p for p, _ in rows], k=10, beam_size=max(cfg.beam_size, 10), exclude=exclude)
    by_count = np.argsort(-train_counts, kind="stable")
    hits = popular_hits = 0
    for e, ex, items in zip(valid, exclude, found):
        targets = set(e.targets.tolist())
        hits += len(targets & {row for row, _ in items})
        popular_hits += len(targets & set([i for i in by_count[: 10 + len(ex)] if i not in ex][:10]))
    n_targets = sum(len(e.targets) for e in valid)
    return {
        "valid_examples": len(valid),
        "valid_targets": n_targets,
        "valid_nll_per_item": nll / n_targets,
        "valid_recall@10": hits / n_targets,
        "valid_popularity_recall@10": popular_hits / n_targets,
        "valid_random_recall@10": 10 / len(vocab.item_ids),
    }


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
