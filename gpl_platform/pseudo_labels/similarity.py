"""Pseudo-label similarity scoring (docs/METHOD.md step 3): ``s(u,i) = max_k cos(e(a_k), e(i))``.

Inputs are plain arrays so that the caller decides where they come from (DuckDB, Feast, parquet):

- ``cand_user_idx (N,)``, ``cand_item_idx (N,)``: one row per (user, unexposed candidate) pair;
  ``cand_item_idx`` indexes rows of ``item_vectors``; user ids are arbitrary integers;
- ``item_vectors (n_items, d)`` and ``anchor_vectors (M, d)``: L2-normalized, so a dot product is
  the cosine (nothing here re-normalizes);
- ``anchor_user_idx (M,)``: the user of each anchor, in the same id space as ``cand_user_idx``.
  A user's anchors need not be contiguous and users may have different anchor counts.

Outputs (``ScoreResult``): ``similarity_max (N,)`` float32, ``argmax_anchor (N,)`` int64 (row of
``anchor_vectors``, ties -> the first of the user's anchors in array order), ``similarity_mean (N,)``
float32. Candidates of a user without anchors get NaN and argmax -1 (``ScoreResult.no_anchor``).

How ``score_candidates`` works (exact, float32, no Python loop over pairs):

1. candidates are sorted by user (skipped when they already are) and each user's run is
   cut into groups of G rows (G in {8, 16, 32, 64}, chosen from the per-user counts to minimise
   padding plus per-group overhead);
2. per chunk of ~2048 rows: item vectors are gathered into a cache-sized buffer
   (g, G, d) and the group's user anchors (g, Kmax, d) (padded with a zero vector), then one
   stacked ``np.matmul`` gives (g, G, Kmax) cosines;
3. max / argmax / mean over the Kmax axis are taken for all rows at once with padding masked.
   When anchor counts are very uneven (Kmax * users > 1.5 * M), users are ordered by anchor
   count first so that each chunk computes only up to its own largest count.

The cost is one pass over the gathered item vectors (memory-bound), about ``N * Kmax * d`` MACs.
Measured alternatives on the 2-core box (see bench/bench_pseudo_label_speed.py): gathering
anchors per candidate (einsum over (c, K, d)) moves K times more memory and was 3-7x slower;
``torch.bmm`` on the same grouped layout was 3-10x slower than numpy's stacked matmul for these
narrow (K=5) outputs; a dense ``items @ anchors.T`` is only sensible for tiny catalogs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_GROUP_SIZES = (8, 16, 32, 64)
_GROUP_OVERHEAD_ROWS = 8  # per-group cost of a stacked matmul slice, in "row" units
_CHUNK_ROWS = 2048


class ScoreResult(NamedTuple):
    similarity_max: np.ndarray  # (N,) float32, NaN where the user has no anchors
    argmax_anchor: np.ndarray  # (N,) int64 row of anchor_vectors, -1 where no anchors
    similarity_mean: np.ndarray  # (N,) float32, NaN where the user has no anchors

    @property
    def no_anchor(self) -> np.ndarray:
        """Boolean mask of candidates whose user has no anchors."""
        return self.argmax_anchor < 0


def as_index(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_vectors(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-d (n, d), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _validate(cand_user_idx, cand_item_idx, item_vectors, anchor_vectors, anchor_user_idx):
    cu = as_index(cand_user_idx, "cand_user_idx")
    ci = as_index(cand_item_idx, "cand_item_idx")
    au = as_index(anchor_user_idx, "anchor_user_idx")
    items = _as_vectors(item_vectors, "item_vectors")
    anchors = _as_vectors(anchor_vectors, "anchor_vectors")
    if cu.shape != ci.shape:
        raise ValueError(f"cand_user_idx {cu.shape} and cand_item_idx {ci.shape} differ in length")
    if au.shape[0] != anchors.shape[0]:
        raise ValueError(f"anchor_user_idx has {au.shape[0]} rows, anchor_vectors {anchors.shape[0]}")
    if anchors.shape[0] and anchors.shape[1] != items.shape[1]:
        raise ValueError(f"dimension mismatch: items d={items.shape[1]}, anchors d={anchors.shape[1]}")
    if ci.size and (ci.min() < 0 or ci.max() >= items.shape[0]):
        raise IndexError(f"cand_item_idx out of range [0, {items.shape[0]})")
    return cu, ci, items, anchors, au


def _anchor_table(au: np.ndarray):
    """Compact users of the anchors; (U, Kmax) table of anchor rows (-1 pad) and counts per user."""
    users, inv = np.unique(au, return_inverse=True)
    order = np.argsort(inv, kind="stable")  # anchors grouped by user, array order kept inside
    counts = np.bincount(inv, minlength=users.size)
    kmax = int(counts.max()) if counts.size else 0
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    table = np.full((users.size, max(kmax, 1)), -1, dtype=np.int64)
    inv_sorted = inv[order]
    rank = np.arange(order.size) - starts[inv_sorted]
    table[inv_sorted, rank] = order
    return users, table, counts


def _choose_group_size(counts: np.ndarray) -> int:
    best, best_cost = _GROUP_SIZES[0], None
    for g in _GROUP_SIZES:
        n_groups = int(((counts + g - 1) // g).sum())
        cost = n_groups * g + n_groups * _GROUP_OVERHEAD_ROWS
        if best_cost is None or cost < best_cost:
            best, best_cost = g, cost
    return best


def score_candidates(
    cand_user_idx: Sequence[int] | np.ndarray,
    cand_item_idx: Sequence[int] | np.ndarray,
    item_vectors: np.ndarray,
    anchor_vectors: np.ndarray,
    anchor_user_idx: Sequence[int] | np.ndarray,
    *,
    chunk_rows: int = _CHUNK_ROWS,
    group_size: int | None = None,
) -> ScoreResult:
    """Max-pooled (and mean-pooled) cosine of each candidate item to its user's anchors.

    Vectorized and exact (float32 accumulation); see the module docstring for the method.
    ``group_size`` forces G (otherwise chosen automatically); ``chunk_rows`` bounds the gather
    buffer (rows of d float32).
    """
    cu, ci, items, anchors, au = _validate(cand_user_idx, cand_item_idx, item_vectors, anchor_vectors, anchor_user_idx)
    n = cu.shape[0]
    sim_max = np.full(n, np.nan, dtype=np.float32)
    sim_mean = np.full(n, np.nan, dtype=np.float32)
    argmax = np.full(n, -1, dtype=np.int64)
    if n == 0 or anchors.shape[0] == 0:
        return ScoreResult(sim_max, argmax, sim_mean)
    d = items.shape[1]

    users, table, a_counts = _anchor_table(au)
    kmax = table.shape[1]
    if users[0] == 0 and users[-1] == users.size - 1:  # ids already compact 0..U-1: skip the search
        has = (cu >= 0) & (cu < users.size)
        pos_c = cu
    else:
        pos_c = np.minimum(np.searchsorted(users, cu), users.size - 1)
        has = users[pos_c] == cu
    keep = np.flatnonzero(has)
    if keep.size == 0:
        return ScoreResult(sim_max, argmax, sim_mean)
    cuser = pos_c[keep]  # compact user of each kept candidate
    # Very uneven anchor counts: order users by count so that each chunk pads only to its own
    # largest count (otherwise every user would pay for Kmax columns).
    uneven = kmax > 1 and kmax * users.size > 1.5 * anchors.shape[0]
    if uneven:
        rank = np.empty(users.size, dtype=np.int64)
        rank[np.argsort(a_counts, kind="stable")] = np.arange(users.size)
        sort_key = rank[cuser]
    else:
        sort_key = cuser
    if sort_key.size > 1 and np.any(sort_key[1:] < sort_key[:-1]):
        order = np.argsort(sort_key, kind="stable")  # measured faster than the default sort here
        keep = keep[order]
        cuser = cuser[order]
    citem = ci[keep]
    nk = keep.size

    # runs of equal users -> groups of G rows
    run_start = np.flatnonzero(np.concatenate(([True], cuser[1:] != cuser[:-1])))
    run_len = np.diff(np.concatenate((run_start, [nk])))
    G = int(group_size) if group_size else _choose_group_size(run_len)
    groups_per_run = (run_len + G - 1) // G
    n_groups = int(groups_per_run.sum())
    group_base = np.concatenate(([0], np.cumsum(groups_per_run)[:-1]))
    within = np.arange(nk) - np.repeat(run_start, run_len)
    slot_flat = (np.repeat(group_base, run_len) + within // G) * G + within % G  # row in padded layout
    group_user = np.repeat(cuser[run_start], groups_per_run)

    padded_item = np.zeros(n_groups * G, dtype=np.int64)
    padded_item[slot_flat] = citem
    # anchor rows per group; -1 pads point at an appended zero vector
    anchors_z = np.concatenate([anchors, np.zeros((1, d), dtype=np.float32)])
    group_anchor_rows = table[group_user]
    group_anchor_rows = np.where(group_anchor_rows < 0, anchors.shape[0], group_anchor_rows)

    S = (np.zeros if uneven else np.empty)((n_groups, G, kmax), dtype=np.float32)
    gpc = max(1, int(chunk_rows) // G)  # groups per chunk
    xbuf = np.empty((gpc * G, d), dtype=np.float32)
    abuf = np.empty((gpc, kmax, d), dtype=np.float32)
    for g0 in range(0, n_groups, gpc):
        g1 = min(n_groups, g0 + gpc)
        ng = g1 - g0
        x = np.take(items, padded_item[g0 * G : g1 * G], axis=0, out=xbuf[: ng * G]).reshape(ng, G, d)
        kc = int(a_counts[group_user[g0:g1]].max()) if uneven else kmax
        a = np.take(anchors_z, group_anchor_rows[g0:g1, :kc], axis=0, out=abuf[:ng, :kc])
        if kc == kmax:
            np.matmul(x, a.transpose(0, 2, 1), out=S[g0:g1])
        else:  # columns kc.. stay 0, like a zero-vector anchor
            S[g0:g1, :, :kc] = np.matmul(x, a.transpose(0, 2, 1))

    s = S.reshape(-1, kmax)[slot_flat]  # (nk, kmax) in sorted candidate order
    k_of = a_counts[cuser]
    total = s.sum(axis=1, dtype=np.float32)  # padding columns are exactly 0
    if kmax > 1:
        invalid = np.arange(kmax)[None, :] >= k_of[:, None]
        if invalid.any():
            s = np.where(invalid, -np.inf, s)
    best = s.argmax(axis=1)
    sim_max[keep] = s[np.arange(nk), best]
    sim_mean[keep] = total / k_of.astype(np.float32)
    argmax[keep] = table[cuser, best]
    return ScoreResult(sim_max, argmax, sim_mean)


def score_candidates_loop(
    cand_user_idx: Sequence[int] | np.ndarray,
    cand_item_idx: Sequence[int] | np.ndarray,
    item_vectors: np.ndarray,
    anchor_vectors: np.ndarray,
    anchor_user_idx: Sequence[int] | np.ndarray,
) -> ScoreResult:
    """Straightforward reference: loop over users, then over (candidate, anchor) pairs with ``np.dot``.

    Only for tests (equality) and the benchmark (speed baseline). Same outputs as ``score_candidates``.
    """
    cu, ci, items, anchors, au = _validate(cand_user_idx, cand_item_idx, item_vectors, anchor_vectors, anchor_user_idx)
    n = cu.shape[0]
    sim_max = np.full(n, np.nan, dtype=np.float32)
    sim_mean = np.full(n, np.nan, dtype=np.float32)
    argmax = np.full(n, -1, dtype=np.int64)
    anchors_of: dict[int, list[int]] = {}
    for k, u in enumerate(au.tolist()):
        anchors_of.setdefault(u, []).append(k)
    cands_of: dict[int, list[int]] = {}
    for c, u in enumerate(cu.tolist()):
        cands_of.setdefault(u, []).append(c)
    for u, cands in cands_of.items():
        ks = anchors_of.get(u)
        if not ks:
            continue
        for c in cands:
            x = items[ci[c]]
            best_k, best_s, acc = -1, np.float32(-np.inf), np.float32(0.0)
            for k in ks:
                s = np.float32(np.dot(x, anchors[k]))
                acc += s
                if s > best_s:
                    best_k, best_s = k, s
            sim_max[c] = best_s
            sim_mean[c] = acc / np.float32(len(ks))
            argmax[c] = best_k
    return ScoreResult(sim_max, argmax, sim_mean)


# ---------------------------------------------------------------------------------------------
# FAISS helpers: catalog-wide nearest items of anchors
# ---------------------------------------------------------------------------------------------


def build_item_index(vectors: np.ndarray):
    """Exact inner-product FAISS index (``faiss.IndexFlatIP``) over L2-normalized item vectors.

    Serves the *catalog-wide* question "which items are nearest to this anchor?": an
    anchor-based recall source, audits of anchors (do they land near plausible items? which
    items does a pseudo-label favour?), recall@k checks of the generator. It does NOT serve
    pseudo-label scoring of a given candidate set: there the pairs are fixed and
    ``score_candidates`` computes exactly those dot products, far cheaper than a search.
    """
    import faiss

    x = _as_vectors(vectors, "vectors")
    index = faiss.IndexFlatIP(x.shape[1])
    if x.shape[0]:
        index.add(x)
    return index


def top_items_for_anchors(
    index, anchor_vectors: np.ndarray, k: int, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items (by cosine) of each anchor, searched in batches of ``batch_size`` anchors.

    Returns ``(scores (M, k) float32, item_rows (M, k) int64)``; rows past ``index.ntotal`` are
    padded with score -inf and item -1 (FAISS convention is -1 ids).
    """
    if k <= 0:
        raise ValueError("k must be positive")
    q = _as_vectors(anchor_vectors, "anchor_vectors")
    if q.shape[0] and q.shape[1] != index.d:
        raise ValueError(f"dimension mismatch: index d={index.d}, anchors d={q.shape[1]}")
    m = q.shape[0]
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    ids = np.full((m, k), -1, dtype=np.int64)
    if m == 0 or index.ntotal == 0:
        return scores, ids
    for s in range(0, m, max(1, batch_size)):
        found_scores, found_ids = index.search(q[s : s + batch_size], k)
        scores[s : s + batch_size] = np.where(found_ids >= 0, found_scores, -np.inf)
        ids[s : s + batch_size] = found_ids
    return scores, ids
