"""Training of the semantic-ID generator (:mod:`gpl_platform.pseudo_labels.semantic_ids.generator`):
training examples, packed batches, the training loop and its held-out metrics.

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

from gpl_platform.anchor_settings import SidGeneratorConfig
from gpl_platform.engine.threads import torch_threads
from gpl_platform.pseudo_labels.semantic_ids.generator import (
    PAD,
    SidTransformer,
    SidVocabulary,
    TrainedSidGenerator,
    beam_search,
    max_tokens,
)
from gpl_platform.pseudo_labels.semantic_ids.rqvae import deterministic_torch

log = logging.getLogger(__name__)
TARGETS_PER_ROW = 16  # a day with more targets spans several packed rows (bounds a row's length)


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
    with deterministic_torch(), torch_threads(cfg.torch_threads):
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
