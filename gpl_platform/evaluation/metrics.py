"""Ranking metrics as GPL_METHOD.md defines them."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-group AUC weighted by the group's size, over groups that have both classes."""
    frame = pd.DataFrame({"g": groups, "y": np.asarray(labels, dtype=int), "s": np.asarray(scores, dtype=float)})
    total, weight = 0.0, 0
    for _, part in frame.groupby("g", sort=False):
        if part["y"].nunique() < 2:
            continue
        total += roc_auc_score(part["y"], part["s"]) * len(part)
        weight += len(part)
    return float(total / weight) if weight else float("nan")
