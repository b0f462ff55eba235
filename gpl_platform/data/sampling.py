"""Vectorized sampling without replacement (Gumbel top-k = Plackett-Luce) and the item co-occurrence of the
sources' recall models."""

from __future__ import annotations

import numpy as np


def gumbel_keys(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """log(w) + Gumbel noise: sorting by these keys draws a Plackett-Luce ranking."""
    with np.errstate(divide="ignore"):
        return np.log(weights) + rng.gumbel(size=np.shape(weights))


def sample_per_row_without(rng: np.random.Generator, weights: np.ndarray, excluded: np.ndarray, n: int) -> np.ndarray:
    """For each row of ``excluded`` (rows x items), draw ``n`` distinct items with probability
    proportional to ``weights`` among the non-excluded ones. Returns (rows, n) item indices,
    -1 where a row has fewer than ``n`` eligible items."""
    rows, n_items = excluded.shape
    n = min(n, n_items)
    if rows == 0 or n == 0:
        return np.empty((rows, n), dtype=np.int64)
    keys = gumbel_keys(rng, np.broadcast_to(weights, excluded.shape))
    keys[excluded] = -np.inf
    top = np.argpartition(-keys, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top[np.take_along_axis(keys, top, axis=1) == -np.inf] = -1
    return top


def rank_within_groups(groups: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank (0 = largest key) of each row within its group, and each row's group size."""
    codes, _ = _factorize(groups)
    order = np.lexsort((-keys, codes))
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    sizes = np.diff(np.r_[starts, len(codes)])
    rank_sorted = np.arange(len(codes)) - np.repeat(starts, sizes)
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = rank_sorted
    size = np.empty(len(codes), dtype=np.int64)
    size[order] = np.repeat(sizes, sizes)
    return rank, size


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(values, return_inverse=True)
    return codes.ravel(), uniques


def item_cooccurrence(interactions: np.ndarray) -> np.ndarray:
    """Item-item cosine of a (users x items) 0/1 interaction matrix, with a zero diagonal (float32)."""
    co = interactions.T @ interactions
    norm = np.sqrt(np.maximum(np.diag(co), 1.0))
    co = co / norm[:, None] / norm[None, :]
    np.fill_diagonal(co, 0.0)
    return co.astype(np.float32, copy=False)
