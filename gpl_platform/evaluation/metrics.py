"""Ranking metrics as docs/METHOD.md defines them."""

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


def hit_rate_at_k(requests: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Per request |top-K ∩ positives| / min(K, |positives|), averaged over requests with a positive."""
    frame = pd.DataFrame({"r": requests, "y": np.asarray(labels, dtype=int), "s": np.asarray(scores, dtype=float)})
    frame = frame[frame.groupby("r")["y"].transform("sum") > 0]
    if frame.empty:
        return float("nan")
    # Rank within request by score (ties broken by position: stable sort).
    frame = frame.sort_values(["r", "s"], ascending=[True, False], kind="stable")
    frame["rank"] = frame.groupby("r").cumcount()
    hits = frame[frame["rank"] < k].groupby("r")["y"].sum()
    positives = frame.groupby("r")["y"].sum()
    return float((hits / np.minimum(k, positives)).mean())


def top_k_lists(requests: np.ndarray, items: np.ndarray, scores: np.ndarray, k: int) -> pd.Series:
    frame = pd.DataFrame({"r": requests, "i": items, "s": np.asarray(scores, dtype=float)})
    frame = frame.sort_values(["r", "s"], ascending=[True, False], kind="stable")
    return frame.groupby("r").head(k).groupby("r")["i"].agg(list)


def coverage_at_k(requests, items, scores, k: int = 10) -> float:
    """Distinct items in all top-K lists / distinct candidate items."""
    lists = top_k_lists(requests, items, scores, k)
    shown = {i for lst in lists for i in lst}
    return float(len(shown) / len(set(items))) if len(items) else float("nan")


def diversity_at_k(requests, items, scores, item_vectors: dict, k: int = 10) -> float:
    """Mean over requests of 1 - mean pairwise cosine of the top-K items' content vectors."""
    values = []
    for lst in top_k_lists(requests, items, scores, k):
        vecs = np.stack([item_vectors[i] for i in lst if i in item_vectors]) if lst else np.zeros((0, 1))
        if len(vecs) < 2:
            continue
        sims = vecs @ vecs.T
        n = len(vecs)
        values.append(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return float(np.mean(values)) if values else float("nan")
