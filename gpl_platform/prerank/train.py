"""Training with actual and pseudo labels: L = BCE(actual) + lambda * w * BCE(pseudo) (docs/METHOD.md step 5).

Every row carries a (possibly soft) label and a weight: exposed rows weight 1 (or an IPS weight),
pseudo-labelled rows lambda * confidence. Deterministic under a seed (CPU, fixed shuffles);
early stopping on the AUC of a validation split of later days' *exposed* candidates, i.e. on
real labels only.

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

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from gpl_platform.config import TrainingConfig
from gpl_platform.prerank.model import IdVocabulary, InputLayout, ModelConfig, PreRanker, build_preranker

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 2
    seed: int = 0


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
    """
    config = config or TrainConfig()
    model_config = model_config or ModelConfig()
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
    best = {"auc": -np.inf, "epoch": -1, "state": None}
    history = []
    began = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            ids = (user_rows[batch], item_rows[batch]) if model.uses_ids else (None, None)
            loss = weighted_bce(model(x[batch], *ids), y[batch], w[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        val_auc = (
            _auc(valid_labels, model.predict(valid_matrix, valid_user_ids, valid_item_ids))
            if len(valid_matrix)
            else float("nan")
        )
        history.append({"epoch": epoch, "train_loss": total / len(x), "valid_auc": val_auc})
        score = val_auc if np.isfinite(val_auc) else -total
        if score > best["auc"]:
            best = {"auc": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= config.patience:
            break
    model.load_state_dict(best["state"])
    model.fit_unknown_ids(rows.matrix, user_rows, item_rows)
    model.eval()
    return model, {
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "best_valid_auc": float(best["auc"]),
        "history": history,
        "seconds": round(time.perf_counter() - began, 2),
        "n_rows": int(len(x)),
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
