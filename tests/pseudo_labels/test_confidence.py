"""Confidence factors: ranges, documented neutral values, clip behaviour, validation."""

from __future__ import annotations

import numpy as np
import pytest

from gpl_platform.pseudo_labels.confidence import (
    anchor_coherence,
    confidence_weights,
    generation_confidence,
    history_consistency,
)


def _norm(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_anchor_coherence_matches_pairwise_mean_and_orders_dispersion():
    rng = np.random.default_rng(0)
    base = _norm(rng.standard_normal((1, 16)))
    tight = _norm(base + 0.05 * rng.standard_normal((4, 16)))  # user 0: coherent
    loose = _norm(rng.standard_normal((4, 16)))  # user 2: dispersed
    single = _norm(rng.standard_normal((1, 16)))  # user 3: one anchor
    A = np.concatenate([tight, loose, single])
    au = np.array([0, 0, 0, 0, 2, 2, 2, 2, 3])
    perm = rng.permutation(au.size)  # order must not matter
    coh = anchor_coherence(A[perm], au[perm], n_users=5)
    assert coh.shape == (5,)
    assert np.isnan(coh[1]) and np.isnan(coh[4])  # no anchors
    assert coh[3] == 1.0  # single anchor: neutral
    assert coh[0] > 0.9 and coh[0] > coh[2]
    assert ((coh[[0, 2, 3]] >= 0) & (coh[[0, 2, 3]] <= 1)).all()
    S = tight @ tight.T
    expect = (S.sum() - np.trace(S)) / 12
    assert coh[0] == pytest.approx(expect, abs=1e-5)
    aff = anchor_coherence(A, au, mapping="affine")
    assert aff[0] == pytest.approx((expect + 1) / 2, abs=1e-5)
    assert anchor_coherence(A, au, single_anchor_value=0.5)[3] == 0.5


def test_anchor_coherence_opposite_anchors_clip_to_zero():
    v = _norm(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert anchor_coherence(v, [0, 0])[0] == 0.0
    assert anchor_coherence(v, [0, 0], mapping="affine")[0] == pytest.approx(0.0, abs=1e-7)


def test_history_consistency_max_mean_and_neutral():
    e = np.eye(4, dtype=np.float32)
    anchors = np.stack([e[0], _norm(np.array([[1, 1, 0, 0]]))[0], e[2], e[3]])
    au = np.array([0, 0, 1, 2])
    history = np.stack([e[0], e[1], e[3] * -1])
    hu = np.array([0, 0, 1])
    hmax = history_consistency(anchors, au, history, hu)
    np.testing.assert_allclose(hmax, [1.0, np.sqrt(0.5), 0.0, 1.0], atol=1e-6)  # user 1 history opposite -> clip 0
    # user 2 has no history -> neutral 1.0; configurable
    assert history_consistency(anchors, au, history, hu, no_history_value=0.5)[3] == 0.5
    hmean = history_consistency(anchors, au, history, hu, reduce="mean")
    np.testing.assert_allclose(hmean[:2], [0.5, np.sqrt(0.5)], atol=1e-6)
    assert (history_consistency(anchors, au, history[:0], hu[:0]) == 1.0).all()
    with pytest.raises(ValueError):
        history_consistency(anchors, au, history, hu, reduce="median")


def test_generation_confidence():
    np.testing.assert_allclose(generation_confidence([1.0, 0.25, 1.5, -0.1]), [1.0, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(generation_confidence([0.25, 1.0], n_tokens=[2, 3]), [0.5, 1.0])
    with pytest.raises(ValueError):
        generation_confidence([np.nan])
    with pytest.raises(ValueError):
        generation_confidence([0.5], n_tokens=[0])


def test_confidence_weights_formula_and_clip():
    coh = np.array([1.0, 0.5, 0.9, 0.0])
    hist = np.array([1.0, 0.5, 0.8, 1.0])
    gen = np.array([1.0, 1.0, 0.5, 1.0])
    w = confidence_weights(coh, hist, gen, alpha=2.0, beta=1.0, gamma=0.5, w_min=0.1)
    expect = np.clip(coh**2 * hist * gen**0.5, 0.1, 1.0)
    np.testing.assert_allclose(w, expect)
    assert w[0] == 1.0 and w[3] == 0.1  # clip at both ends
    assert ((w >= 0.1) & (w <= 1.0)).all()
    # exponent 0 switches a factor off, even where it is NaN
    w0 = confidence_weights([np.nan, 0.2], [0.5, 0.5], [1.0, 1.0], alpha=0.0, w_min=0.0)
    np.testing.assert_allclose(w0, [0.5, 0.5])
    # NaN with a positive exponent propagates (no pseudo-label)
    assert np.isnan(confidence_weights([np.nan], [1.0], [1.0])[0])
    # scalars broadcast; tiny float excess tolerated
    np.testing.assert_allclose(confidence_weights(1.0 + 1e-7, [0.5, 1.0], 1.0, w_min=0.0), [0.5, 1.0])


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": -1.0}, {"beta": np.nan}, {"gamma": -0.1}, {"w_min": -0.1}, {"w_min": 1.5}],
)
def test_confidence_weights_validation(kwargs):
    with pytest.raises(ValueError):
        confidence_weights([0.5], [0.5], [0.5], **kwargs)


def test_confidence_weights_rejects_out_of_range_factors_and_bad_shapes():
    with pytest.raises(ValueError, match="c_hist"):
        confidence_weights([0.5], [1.2], [0.5])
    with pytest.raises(ValueError, match="shapes"):
        confidence_weights([0.5, 0.5], [0.5, 0.5, 0.5], [0.5])
