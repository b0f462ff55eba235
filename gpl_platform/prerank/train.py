"""Training with actual and pseudo labels: L = BCE(actual) + lambda * w * BCE(pseudo) (GPL_METHOD.md step 5).

Every row carries a (possibly soft) label and a weight: exposed rows weight 1 (or an IPS weight),
pseudo-labelled rows lambda * confidence. Deterministic under a seed (CPU, fixed shuffles);
early stopping on the AUC of a validation split of later days' *exposed* candidates, i.e. on
real labels only.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from gpl_platform.prerank.model import InputLayout, ModelConfig, PreRanker

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 2
    seed: int = 0


@dataclass
class TrainingRows:
    """What the model learns from: features, (soft) labels in [0, 1], per-row weights."""

    matrix: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    is_pseudo: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.matrix)
        for name in ("labels", "weights", "is_pseudo"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, matrix has {n}")
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


def train_preranker(rows: TrainingRows, columns: list[str], valid_matrix: np.ndarray, valid_labels: np.ndarray,
                    model_config: ModelConfig | None = None, config: TrainConfig | None = None
                    ) -> tuple[PreRanker, dict]:
    """Train; return the best-validation model and its training history."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    layout = InputLayout.from_columns(columns).fit_scaling(rows.matrix)
    model = PreRanker(layout, model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
            batch = order[start:start + config.batch_size]
            optimizer.zero_grad()
            loss = weighted_bce(model(x[batch]), y[batch], w[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        val_auc = _auc(valid_labels, model.predict(valid_matrix)) if len(valid_matrix) else float("nan")
        history.append({"epoch": epoch, "train_loss": total / len(x), "valid_auc": val_auc})
        score = val_auc if np.isfinite(val_auc) else -total
        if score > best["auc"]:
            best = {"auc": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= config.patience:
            break
    model.load_state_dict(best["state"])
    model.eval()
    return model, {"epochs_run": len(history), "best_epoch": best["epoch"], "best_valid_auc": float(best["auc"]),
                   "history": history, "seconds": round(time.perf_counter() - began, 2),
                   "n_rows": int(len(x)), "n_pseudo": int(rows.is_pseudo.sum()),
                   "train_config": asdict(config)}
