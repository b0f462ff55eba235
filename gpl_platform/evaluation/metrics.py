"""Ranking metrics as docs/METHOD.md defines them."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

#: a segment with fewer rows reports its row count and a note, not a number (too noisy to compare methods)
MIN_SEGMENT_ROWS = 1000


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _midranks(codes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score within its group (``codes``), ties sharing their mean rank: one sort, no
    loop per group."""
    n = len(codes)
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((scores, codes))
    c, s = codes[order], scores[order]
    new_group = np.empty(n, bool)
    new_group[0], new_group[1:] = True, c[1:] != c[:-1]
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run_start = np.flatnonzero(new_run)
    run_of = np.cumsum(new_run) - 1
    run_len = np.diff(np.append(run_start, n))
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]
    ranks = np.empty(n)
    ranks[order] = run_start[run_of] - group_start + (run_len[run_of] + 1) / 2
    return ranks


def _checked(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.size and (y.min() < 0 or y.max() > 1):  # ranks count positives by summing labels
        raise ValueError("labels must be 0 or 1")
    return y, s


def _group_auc(codes: np.ndarray, y: np.ndarray, s: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Size and AUC (Mann-Whitney, ties count 1/2) of every group; NaN where a group has one class only."""
    size = np.bincount(codes, minlength=n_groups).astype(float)
    pos = np.bincount(codes, weights=y, minlength=n_groups)
    rank_sum = np.bincount(codes, weights=_midranks(codes, s) * y, minlength=n_groups)
    neg = size - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
    return size, np.where((pos > 0) & (neg > 0), values, np.nan)


def per_group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """``[group, n, auc]`` for every group with both classes (``n``: the group's rows), in order of first
    appearance; O(n log n) for all groups together."""
    y, s = _checked(labels, scores)
    codes, uniques = pd.factorize(np.asarray(groups), sort=False)
    keep = codes >= 0  # a missing group id belongs to no group (as in DataFrame.groupby)
    codes, y, s = codes[keep], y[keep], s[keep]
    size, values = _group_auc(codes, y, s, len(uniques))
    both = ~np.isnan(values)
    return pd.DataFrame({"group": uniques[both], "n": size[both].astype(int), "auc": values[both]})


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-group AUC weighted by the group's size, over groups that have both classes."""
    per = per_group_auc(groups, labels, scores)
    weight = per["n"].sum()
    return float((per["auc"] * per["n"]).sum() / weight) if weight else float("nan")


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


def request_metrics(
    requests: np.ndarray, labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None, k: int = 10
) -> pd.DataFrame:
    """Per-request sufficient statistics of the rows in ``mask`` (all rows by default), indexed by request id
    (sorted), so that GAUC, HR@K and pooled AUC of any resample of requests are sums of these columns and no
    AUC is computed again:

    - ``n``: the request's rows; ``pos``: its positives;
    - ``auc``: AUC of its rows (NaN unless both classes): GAUC = sum(n * auc) / sum(n) over non-NaN ``auc``;
    - ``hits@K``: positives among its top K (ties broken by row order, as :func:`hit_rate_at_k`);
      ``hr@K`` = hits@K / min(K, pos), NaN without a positive: HR@K = mean of the non-NaN ``hr@K``;
    - ``pooled_pairs``: (positive, negative) pairs of the *whole pool* (every row in ``mask``) that involve one
      of the request's rows and are ordered right (ties 1/2); every pair is counted by both its requests, so
      pooled AUC = sum(pooled_pairs) / 2 / (sum(pos) * sum(n - pos)).
    """
    y, s = _checked(labels, scores)
    req = np.asarray(requests)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        req, y, s = req[mask], y[mask], s[mask]
    codes, uniques = pd.factorize(req, sort=True)
    keep = codes >= 0  # a missing request id belongs to no request
    codes, y, s = codes[keep], y[keep], s[keep]
    n_req = len(uniques)
    size, values = _group_auc(codes, y, s, n_req)
    pos = np.bincount(codes, weights=y, minlength=n_req)
    # top K: by score descending, then row order (a stable sort)
    order = np.lexsort((np.arange(len(s)), -s, codes))
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    top = order[np.arange(len(order)) - first < k]
    hits = np.bincount(codes[top], weights=y[top], minlength=n_req)
    with np.errstate(divide="ignore", invalid="ignore"):
        hr = np.where(pos > 0, hits / np.minimum(k, pos), np.nan)
    # pooled pairs: a positive's right-ordered negatives = its rank in the pool - its rank among positives;
    # a negative's = positives above it = P - (its rank in the pool - its rank among negatives)
    pool_rank = _midranks(np.zeros(len(s), dtype=np.int64), s)
    class_rank = _midranks(y.astype(np.int64), s)
    below = pool_rank - class_rank
    right = np.where(y == 1, below, y.sum() - below)
    pairs = np.bincount(codes, weights=right, minlength=n_req)
    return pd.DataFrame(
        {"n": size.astype(int), "pos": pos.astype(int), "auc": values, f"hits@{k}": hits.astype(int)}
        | {f"hr@{k}": hr, "pooled_pairs": pairs},
        index=pd.Index(uniques, name="request_id"),
    )


def from_request_metrics(frame: pd.DataFrame, metric: str) -> float:
    """``gauc``, ``hr@K`` or ``auc`` (pooled) from a :func:`request_metrics` frame (or a resample of its rows:
    the pooled AUC is then the approximation of :mod:`gpl_platform.evaluation.uncertainty`)."""
    if metric == "gauc":
        ok = frame["auc"].notna()
        weight = frame.loc[ok, "n"].sum()
        return float((frame.loc[ok, "auc"] * frame.loc[ok, "n"]).sum() / weight) if weight else float("nan")
    if metric.startswith("hr@"):
        values = frame[metric].dropna()
        return float(values.mean()) if len(values) else float("nan")
    if metric == "auc":
        pos, neg = frame["pos"].sum(), (frame["n"] - frame["pos"]).sum()
        return float(frame["pooled_pairs"].sum() / 2 / (pos * neg)) if pos and neg else float("nan")
    raise ValueError(f"unknown metric {metric!r} (gauc, auc or hr@K)")


def segment_metrics(
    requests: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray,
    metric: str = "gauc",
    min_rows: int = MIN_SEGMENT_ROWS,
) -> dict:
    """One metric (``gauc``, ``auc`` or ``hr@K``) on the rows of a segment, with its row count:
    ``{"n": rows, "value": x}``; under ``min_rows`` rows, or when the metric is undefined there (one class),
    ``{"n": rows, "value": None, "note": why}`` instead of a number nobody should compare."""
    mask = np.asarray(mask, dtype=bool)
    rows = int(mask.sum())
    if rows < min_rows:
        return {"n": rows, "value": None, "note": f"under {min_rows} rows"}
    k = int(metric[3:]) if metric.startswith("hr@") else 10
    value = from_request_metrics(request_metrics(requests, labels, scores, mask, k=k), metric)
    if not np.isfinite(value):
        notes = {"gauc": "no request with both classes", "auc": "one class only"}
        return {"n": rows, "value": None, "note": notes.get(metric, "no request with a positive")}
    return {"n": rows, "value": value}


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
