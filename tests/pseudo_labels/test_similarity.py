"""Vectorized pseudo-label scoring equals the per-pair loop baseline; FAISS helpers."""

from __future__ import annotations

import numpy as np
import pytest

from gpl_platform.pseudo_labels.similarity import (
    build_item_index,
    score_candidates,
    score_candidates_loop,
    top_items_for_anchors,
)


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_case(seed: int, n_users=60, n_items=400, d=24, n_cand=4000, user_offset=0):
    rng = np.random.default_rng(seed)
    items = _norm(rng.standard_normal((n_items, d)))
    # uneven anchor counts (1..7), every 5th user has none; anchors shuffled (not contiguous)
    au = np.concatenate([np.full(rng.integers(1, 8), u) for u in range(n_users) if u % 5 != 0])
    rng.shuffle(au)
    anchors = _norm(rng.standard_normal((au.size, d)))
    cu = rng.integers(0, n_users + 3, n_cand)  # includes users unknown to the anchors
    ci = rng.integers(0, n_items, n_cand)
    return cu + user_offset, ci, items, anchors, au + user_offset


def _assert_same(a, b):
    np.testing.assert_array_equal(np.isnan(a.similarity_max), np.isnan(b.similarity_max))
    np.testing.assert_allclose(a.similarity_max, b.similarity_max, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(a.similarity_mean, b.similarity_mean, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(a.argmax_anchor, b.argmax_anchor)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_equals_loop(seed):
    case = _random_case(seed)
    fast = score_candidates(*case)
    slow = score_candidates_loop(*case)
    _assert_same(fast, slow)
    assert fast.similarity_max.dtype == np.float32 and fast.argmax_anchor.dtype == np.int64
    assert fast.no_anchor.any() and not fast.no_anchor.all()
    # no-anchor users: NaN and -1
    cu, _, _, _, au = case
    missing = ~np.isin(cu, au)
    assert np.array_equal(fast.no_anchor, missing)
    assert np.isnan(fast.similarity_mean[missing]).all()


@pytest.mark.parametrize("group_size,chunk_rows", [(8, 16), (16, 100), (32, 2048), (64, 64)])
def test_group_and_chunk_sizes_do_not_change_results(group_size, chunk_rows):
    case = _random_case(7)
    _assert_same(score_candidates(*case, group_size=group_size, chunk_rows=chunk_rows), score_candidates_loop(*case))


def test_sorted_input_sparse_user_ids_and_float64():
    cu, ci, items, anchors, au = _random_case(3, user_offset=10**9)
    order = np.argsort(cu, kind="stable")
    fast = score_candidates(cu[order], ci[order], items.astype(np.float64), anchors, au)
    _assert_same(fast, score_candidates_loop(cu[order], ci[order], items, anchors, au))


def test_argmax_is_the_max_and_mean_le_max():
    cu, ci, items, anchors, au = _random_case(4)
    r = score_candidates(cu, ci, items, anchors, au)
    ok = ~r.no_anchor
    direct = np.einsum("nd,nd->n", items[ci[ok]], anchors[r.argmax_anchor[ok]])
    np.testing.assert_allclose(direct, r.similarity_max[ok], atol=1e-5)
    assert (au[r.argmax_anchor[ok]] == cu[ok]).all()
    assert (r.similarity_mean[ok] <= r.similarity_max[ok] + 1e-6).all()


def test_ties_pick_first_anchor_in_array_order():
    items = _norm(np.eye(3, dtype=np.float32))
    anchors = np.stack([items[1], items[0], items[0]])  # anchors 1 and 2 tie for item 0
    r = score_candidates([7, 7], [0, 1], items, anchors, [7, 7, 7])
    assert r.argmax_anchor.tolist() == [1, 0]
    np.testing.assert_allclose(r.similarity_mean, [2 / 3, 1 / 3], atol=1e-6)


def test_edge_cases():
    items = _norm(np.random.default_rng(0).standard_normal((5, 4)))
    empty = score_candidates([], [], items, items[:2], [0, 1])
    assert empty.similarity_max.shape == (0,)
    no_anchors = score_candidates([0, 1], [0, 1], items, np.zeros((0, 4), np.float32), [])
    assert np.isnan(no_anchors.similarity_max).all() and (no_anchors.argmax_anchor == -1).all()
    with pytest.raises(IndexError):
        score_candidates([0], [5], items, items[:1], [0])
    with pytest.raises(ValueError):
        score_candidates([0, 1], [0], items, items[:1], [0])
    with pytest.raises(ValueError):
        score_candidates([0], [0], items, items[:1, :3], [0])
    with pytest.raises(TypeError):
        score_candidates([0.5], [0], items, items[:1], [0])


def test_faiss_top_items_match_bruteforce():
    rng = np.random.default_rng(5)
    items = _norm(rng.standard_normal((500, 32)))
    anchors = _norm(rng.standard_normal((37, 32)))
    index = build_item_index(items)
    scores, ids = top_items_for_anchors(index, anchors, k=5, batch_size=8)
    brute = anchors @ items.T
    expect = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expect)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expect, axis=1), atol=1e-5)
    # k larger than the catalog pads with -1 / -inf
    s2, i2 = top_items_for_anchors(build_item_index(items[:3]), anchors[:2], k=5)
    assert (i2[:, 3:] == -1).all() and np.isneginf(s2[:, 3:]).all()
    with pytest.raises(ValueError):
        top_items_for_anchors(index, anchors, k=0)


def test_very_uneven_anchor_counts():
    rng = np.random.default_rng(11)
    items = _norm(rng.standard_normal((200, 16)))
    au = np.concatenate([np.full(40, 3), np.repeat(np.arange(30), 2), [31]])  # one user with 40 anchors
    anchors = _norm(rng.standard_normal((au.size, 16)))
    cu = rng.integers(0, 33, 3000)
    ci = rng.integers(0, 200, 3000)
    for chunk_rows in (16, 2048):
        _assert_same(
            score_candidates(cu, ci, items, anchors, au, chunk_rows=chunk_rows),
            score_candidates_loop(cu, ci, items, anchors, au),
        )
