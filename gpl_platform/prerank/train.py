"""Training with actual and pseudo labels: L = BCE(actual) + lambda * w * BCE(pseudo) (docs/METHOD.md step 5).

Every row carries a (possibly soft) label and a weight: exposed rows weight 1 (or an IPS weight),
pseudo-labelled rows lambda * confidence. Deterministic under a seed (CPU, fixed shuffles);
early stopping on the AUC of a validation split of later days' *exposed* candidates, i.e. on
real labels only.

The budget is counted in optimizer steps by default (``budget="steps"``): validation every
``eval_every_steps`` steps, stop after ``patience_evals`` evaluations without improvement or at
``max_steps``. Rows are still drawn by shuffled passes over the data, but a method with five times
the rows gets the same steps and the same evaluation schedule, not five times the updates; an epoch
budget would compare methods at different amounts of training. ``budget="epochs"`` is the former
schedule (validation after every pass, ``patience`` passes), kept so older runs can be reproduced.

The shape comes from ``ModelConfig.shape``; the id shapes (``two_tower``, ``cold``) also need each
row's user and item id and the vocabularies (all user ids, the whole item catalog). Their id
embeddings are trained by Adam without weight decay, so the row of an item no training row
mentions (never exposed, no pseudo-label) stays exactly at its initial value.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from gpl_platform.config import TrainingConfig
from gpl_platform.engine.threads import torch_threads
from gpl_platform.prerank.inputs import IdVocabulary, InputLayout
from gpl_platform.prerank.model import ModelConfig, PreRanker, build_preranker

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The trainer's settings; :func:`train_config_from` maps :class:`~gpl_platform.config.TrainingConfig`
    onto it. ``max_steps``, ``eval_every_steps`` and ``patience_evals`` apply to ``budget="steps"``,
    ``epochs`` and ``patience`` (in passes) to ``budget="epochs"``."""

    epochs: int = 15
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 2
    seed: int = 0
    # the defaults of TrainingConfig (config.py says why these values)
    budget: Literal["steps", "epochs"] = "steps"
    max_steps: int = 4000
    eval_every_steps: int = 20
    patience_evals: int = 25
    torch_threads: int | None = 1  # engine/threads.py says why 1

    def __post_init__(self) -> None:
        if self.budget not in ("steps", "epochs"):
            raise ValueError(f"budget must be 'steps' or 'epochs', not {self.budget!r}")
        for name in ("epochs", "batch_size", "patience", "max_steps", "eval_every_steps", "patience_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def train_config_from(cfg: TrainingConfig, seed: int) -> TrainConfig:
    """The trainer's config for ``cfg`` and one seed: the one mapping the evaluation and the training
    asset share, so both train under the same budget."""
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        patience=cfg.patience,
        seed=seed,
        budget=cfg.budget,
        max_steps=cfg.max_steps,
        eval_every_steps=cfg.eval_every_steps,
        patience_evals=cfg.patience_evals,
        torch_threads=cfg.torch_threads,
    )


def model_config_from(cfg: TrainingConfig) -> ModelConfig:
    """The model settings of a :class:`~gpl_platform.config.TrainingConfig` (shape, id embedding size)."""
    return ModelConfig(shape=cfg.preranker, id_dim=cfg.id_embedding_dim)


@dataclass
class TrainingRows:
    """What the model learns from: features, (soft) labels in [0, 1], per-row weights, and for the
    id shapes each row's user and item id (string arrays)."""

    matrix: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    is_pseudo: np.ndarray
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.matrix)
        for name in ("labels", "weights", "is_pseudo", "user_ids", "item_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows, matrix has {n}")
        for name in ("user_ids", "item_ids"):
            ids = getattr(self, name)
            if ids is not None:
                if pd.isna(ids).any():
                    raise ValueError(f"{name} has missing values")
                setattr(self, name, np.asarray(ids).astype(str))
        if n == 0:
            raise ValueError("no training rows")
        if not np.isfinite(self.labels).all() or (self.labels < 0).any() or (self.labels > 1).any():
            raise ValueError("labels must be finite and in [0, 1]")
        if not np.isfinite(self.weights).all() or (self.weights < 0).any():
            raise ValueError("weights must be finite and >= 0")


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * BCE(sigmoid(logit_i), y_i) / n: the GPL loss when w is 1 for actual rows and
    lambda * confidence for pseudo rows."""
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weights * per_row).sum() / len(logits)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def train_preranker(
    rows: TrainingRows,
    columns: list[str],
    valid_matrix: np.ndarray,
    valid_labels: np.ndarray,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    *,
    valid_user_ids: Sequence[str] | None = None,
    valid_item_ids: Sequence[str] | None = None,
    user_vocab: Sequence[str] | None = None,
    item_vocab: Sequence[str] | None = None,
) -> tuple[PreRanker, dict]:
    """Train; return the best-validation model and its training history.

    The id shapes need ``rows.user_ids``/``rows.item_ids``, the validation rows' ids and the
    vocabularies: ``user_vocab`` all user ids, ``item_vocab`` the whole catalog (never-exposed
    items included, so their pseudo-labels can train their rows). ``mlp`` ignores ids.

    The history: ``budget``; ``steps`` (optimizer steps) and ``epochs_run`` (passes over the rows,
    fractional under a step budget); ``best_step`` and ``best_epoch`` (the 0-based pass it fell in) of
    the restored weights and their score ``best_valid_auc`` (validation AUC, or -training loss when
    the validation labels have one class); ``hit_cap``: stopped by ``max_steps`` (or ``epochs``) while
    still within patience, i.e. possibly not converged; ``history``: one entry per evaluation (step,
    epochs_run so far, training loss since the previous evaluation, validation AUC). torch uses
    ``config.torch_threads`` intra-op threads meanwhile.
    """
    config = config or TrainConfig()
    with torch_threads(config.torch_threads):
        return _train_preranker(
            rows,
            columns,
            valid_matrix,
            valid_labels,
            model_config or ModelConfig(),
            config,
            valid_user_ids=valid_user_ids,
            valid_item_ids=valid_item_ids,
            user_vocab=user_vocab,
            item_vocab=item_vocab,
        )


def _train_preranker(
    rows: TrainingRows,
    columns: list[str],
    valid_matrix: np.ndarray,
    valid_labels: np.ndarray,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    valid_user_ids: Sequence[str] | None = None,
    valid_item_ids: Sequence[str] | None = None,
    user_vocab: Sequence[str] | None = None,
    item_vocab: Sequence[str] | None = None,
) -> tuple[PreRanker, dict]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    layout = InputLayout.from_columns(columns).fit_scaling(rows.matrix)
    model = build_preranker(layout, model_config, user_vocab, item_vocab)
    if model.uses_ids and (rows.user_ids is None or rows.item_ids is None):
        raise ValueError(
            f"the {model_config.shape} pre-ranker needs the training rows' user_ids and item_ids "
            "(rows_from_plan(plan, matrix, train))"
        )
    user_rows, item_rows = model.id_rows(len(rows.matrix), rows.user_ids, rows.item_ids)
    if len(valid_matrix):
        model.id_rows(len(valid_matrix), valid_user_ids, valid_item_ids)  # fail now, not after the first epoch
    optimizer = torch.optim.Adam(model.parameter_groups(config.weight_decay), lr=config.lr)
    x = torch.from_numpy(np.ascontiguousarray(rows.matrix, dtype=np.float32))
    y = torch.from_numpy(rows.labels.astype(np.float32))
    w = torch.from_numpy(rows.weights.astype(np.float32))
    n = len(x)
    by_steps = config.budget == "steps"
    patience = config.patience_evals if by_steps else config.patience
    best = {"score": -np.inf, "eval": -1, "step": 0, "epoch": -1, "state": None}
    history = []
    steps = rows_seen = 0
    window_loss, window_rows = 0.0, 0  # the training loss since the last evaluation
    stopped_by = None
    began = time.perf_counter()
    epoch = 0
    while stopped_by is None:
        model.train()
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            ids = (user_rows[batch], item_rows[batch]) if model.uses_ids else (None, None)
            loss = weighted_bce(model(x[batch], *ids), y[batch], w[batch])
            loss.backward()
            optimizer.step()
            steps += 1
            rows_seen += len(batch)
            window_loss += float(loss.detach()) * len(batch)
            window_rows += len(batch)
            end_of_pass = start + config.batch_size >= n
            # steps: the same evaluation steps for every row count (and one at the cap);
            # epochs: after every pass, as before
            if by_steps and not (steps % config.eval_every_steps == 0 or steps >= config.max_steps):
                continue
            if not by_steps and not end_of_pass:
                continue
            val_auc = (
                _auc(valid_labels, model.predict(valid_matrix, valid_user_ids, valid_item_ids))
                if len(valid_matrix)
                else float("nan")
            )
            model.train()  # predict switched to eval mode; an evaluation mid-pass resumes with dropout
            train_loss = window_loss / window_rows
            window_loss, window_rows = 0.0, 0
            history.append(
                {"step": steps, "epochs_run": round(rows_seen / n, 2), "train_loss": train_loss, "valid_auc": val_auc}
            )
            score = val_auc if np.isfinite(val_auc) else -train_loss
            if score > best["score"]:
                best = {
                    "score": score,
                    "eval": len(history) - 1,
                    "step": steps,
                    "epoch": epoch,
                    "state": copy.deepcopy(model.state_dict()),
                }
            # patience is checked before the cap: a run that stops on both did converge
            if len(history) - 1 - best["eval"] >= patience:
                stopped_by = "patience"
            elif (steps >= config.max_steps) if by_steps else (epoch + 1 >= config.epochs):
                stopped_by = "cap"
            if stopped_by:
                break
        epoch += 1
    if best["state"] is None:
        raise ValueError("training diverged: no evaluation had a finite score (validation AUC or training loss)")
    model.load_state_dict(best["state"])
    model.fit_unknown_ids(rows.matrix, user_rows, item_rows)
    model.eval()
    return model, {
        "budget": config.budget,
        "steps": steps,
        "epochs_run": round(rows_seen / n, 2),
        "best_step": best["step"],
        "best_epoch": best["epoch"],
        "best_valid_auc": float(best["score"]),
        "hit_cap": stopped_by == "cap",
        "history": history,
        "seconds": round(time.perf_counter() - began, 2),
        "n_rows": int(n),
        "n_pseudo": int(rows.is_pseudo.sum()),
        "train_config": asdict(config),
        "shape": model.shape,
        "n_rows_out_of_vocabulary": _rows_out_of_vocabulary(user_rows, item_rows),
    }


def _rows_out_of_vocabulary(user_rows: torch.Tensor | None, item_rows: torch.Tensor | None) -> int:
    """Training rows whose user or item fell into the OOV bucket (a vocabulary that misses ids)."""
    if user_rows is None:
        return 0
    return int(((user_rows == IdVocabulary.OOV_ROW) | (item_rows == IdVocabulary.OOV_ROW)).sum())
