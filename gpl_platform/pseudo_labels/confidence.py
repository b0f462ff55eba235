"""Uncertainty-aware confidence of pseudo-labels (docs/METHOD.md step 4).

    w(u,i) = clip(c_coh(u)^alpha * c_hist(u,k*)^beta * c_gen(u,k*)^gamma, w_min, 1)

with k* the arg-max anchor of the candidate (``ScoreResult.argmax_anchor``). Each factor lies in
[0, 1] and 1 is "no reason to doubt": an exponent of 0 switches a factor off (ablation), and a
factor that cannot be measured takes the neutral value 1 unless told otherwise.

Shapes, so that the caller can go from anchors to candidates with plain indexing:

- ``anchor_coherence`` -> per user, indexed by the (non-negative int) user index:
  ``c_coh_per_candidate = coh[cand_user_idx]``;
- ``history_consistency`` and ``generation_confidence`` -> per anchor:
  ``c_hist_per_candidate = hist[argmax_anchor]`` (for candidates with ``argmax_anchor >= 0``).

Choices (and why):

- Coherence is the mean pairwise cosine of a user's anchors (computed from ``||sum a||^2``, O(M d)),
  mapped to [0, 1] by clipping at 0 (``mapping="clip"``, default). In MiniLM space unrelated texts
  sit near cosine 0-0.2 and related ones at 0.4+, so clipping uses the whole [0, 1] range and the
  exponent alpha controls how hard dispersion is punished; ``mapping="affine"`` ((cos+1)/2) is the
  gentler alternative (values in practice within [0.5, 1]). A user with a single anchor has no
  pairs, hence no evidence of dispersion: it gets ``single_anchor_value`` (default 1.0, neutral);
  how much to trust a single anchor is the generator's confidence (c_gen), not dispersion.
  Users without anchors get NaN (they have no pseudo-labels).
- History consistency of an anchor is the max (default) or mean cosine to the user's history
  item embeddings, clipped to [0, 1]. Max asks "is this anchor grounded in something the user
  liked?"; mean also punishes users with diverse histories. When the anchors *are* history
  items (the no-LLM ablation), max is 1 for every anchor, i.e. neutral. Users with no history
  vectors get ``no_history_value`` (default 1.0: nothing to check against, no penalty).
- Generation confidence is the anchor's generation probability clipped to [0, 1]; non-LLM
  anchors pass 1.0. A whole-sequence probability shrinks with length, so with ``n_tokens`` it is
  length-normalised to the per-token geometric mean ``p ** (1 / n_tokens)``.
"""

from __future__ import annotations

import numpy as np

from gpl_platform.pseudo_labels.similarity import as_index, score_candidates

_TOL = 1e-5


def _user_index(a, name: str) -> np.ndarray:
    arr = as_index(a, name)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative user indices")
    return arr


def _vectors(a, name: str, n: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{name} must be (n={n}, d), got shape {arr.shape}")
    return arr


def anchor_coherence(
    anchor_vectors: np.ndarray,
    anchor_user_idx: np.ndarray,
    n_users: int | None = None,
    *,
    mapping: str = "clip",
    single_anchor_value: float = 1.0,
) -> np.ndarray:
    """Per-user coherence of the anchors in [0, 1] (float64, length ``n_users``, NaN = no anchors).

    ``n_users`` defaults to ``max(anchor_user_idx) + 1``. See the module docstring for the choices.
    """
    au = _user_index(anchor_user_idx, "anchor_user_idx")
    A = _vectors(anchor_vectors, "anchor_vectors", au.size).astype(np.float64)
    if mapping not in ("clip", "affine"):
        raise ValueError("mapping must be 'clip' or 'affine'")
    if not 0.0 <= single_anchor_value <= 1.0:
        raise ValueError("single_anchor_value must be in [0, 1]")
    n = int(n_users) if n_users is not None else (int(au.max()) + 1 if au.size else 0)
    if au.size and au.max() >= n:
        raise ValueError(f"anchor_user_idx has a user >= n_users={n}")
    out = np.full(n, np.nan, dtype=np.float64)
    if au.size == 0:
        return out
    counts = np.bincount(au, minlength=n)
    order = np.argsort(au, kind="stable")
    users = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts[users])[:-1]))
    sums = np.add.reduceat(A[order], starts, axis=0)  # (n_present, d)
    sq = np.add.reduceat((A[order] ** 2).sum(axis=1), starts)  # sum of squared norms
    k = counts[users].astype(np.float64)
    pair_sum = (sums**2).sum(axis=1) - sq
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_cos = pair_sum / (k * (k - 1.0))
    mean_cos = np.clip(mean_cos, -1.0, 1.0)
    coh = np.clip(mean_cos, 0.0, 1.0) if mapping == "clip" else (mean_cos + 1.0) / 2.0
    coh = np.where(k < 2, single_anchor_value, coh)
    out[users] = coh
    return out


def history_consistency(
    anchor_vectors: np.ndarray,
    anchor_user_idx: np.ndarray,
    history_vectors: np.ndarray,
    history_user_idx: np.ndarray,
    *,
    reduce: str = "max",
    no_history_value: float = 1.0,
) -> np.ndarray:
    """Per-anchor consistency with the user's history items, in [0, 1] (float64, length M).

    ``reduce="max"`` (default) or ``"mean"`` cosine between the anchor and the user's history item
    vectors, clipped at 0. Users without history get ``no_history_value``. Uses the vectorized
    scorer with the anchors as "candidates" and the history items as "anchors".
    """
    if reduce not in ("max", "mean"):
        raise ValueError("reduce must be 'max' or 'mean'")
    if not 0.0 <= no_history_value <= 1.0:
        raise ValueError("no_history_value must be in [0, 1]")
    au = _user_index(anchor_user_idx, "anchor_user_idx")
    hu = _user_index(history_user_idx, "history_user_idx")
    A = _vectors(anchor_vectors, "anchor_vectors", au.size)
    H = _vectors(history_vectors, "history_vectors", hu.size)
    if au.size == 0:
        return np.zeros(0, dtype=np.float64)
    if hu.size == 0:
        return np.full(au.size, no_history_value, dtype=np.float64)
    if H.shape[1] != A.shape[1]:
        raise ValueError(f"dimension mismatch: anchors d={A.shape[1]}, history d={H.shape[1]}")
    res = score_candidates(au, np.arange(au.size), A, H, hu)
    sim = (res.similarity_max if reduce == "max" else res.similarity_mean).astype(np.float64)
    out = np.clip(sim, 0.0, 1.0)
    return np.where(res.no_anchor, no_history_value, out)


def generation_confidence(gen_prob, n_tokens=None) -> np.ndarray:
    """Per-anchor generation confidence in [0, 1] (float64).

    ``gen_prob``: probability of the anchor under its generator (1.0 for non-LLM anchors).
    ``n_tokens`` (optional, per anchor or scalar, >= 1): length-normalise to ``p ** (1/n_tokens)``.
    NaN is refused (fill missing probabilities explicitly, e.g. with 1.0).
    """
    p = np.asarray(gen_prob, dtype=np.float64)
    if np.isnan(p).any():
        raise ValueError("gen_prob contains NaN; fill missing values explicitly")
    p = np.clip(p, 0.0, 1.0)
    if n_tokens is not None:
        t = np.asarray(n_tokens, dtype=np.float64)
        if np.isnan(t).any() or (t < 1).any():
            raise ValueError("n_tokens must be >= 1")
        p = p ** (1.0 / t)
    return p


def _factor(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < -_TOL or finite.max() > 1 + _TOL):
        raise ValueError(f"{name} must lie in [0, 1] (got range [{finite.min():.6g}, {finite.max():.6g}])")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains inf")
    return np.clip(arr, 0.0, 1.0)


def confidence_weights(
    c_coh_per_candidate,
    c_hist_per_candidate,
    c_gen_per_candidate,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    w_min: float = 0.05,
) -> np.ndarray:
    """``clip(c_coh^alpha * c_hist^beta * c_gen^gamma, w_min, 1)``, vectorized (float64).

    Factors must be in [0, 1] (tiny float excess is clipped) and broadcast to one shape. An
    exponent 0 switches its factor off (even where it is NaN). NaN in a factor with a positive
    exponent gives NaN (no weight: the candidate has no pseudo-label).
    """
    for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if not np.isfinite(w_min) or not 0.0 <= w_min <= 1.0:
        raise ValueError(f"w_min must be in [0, 1], got {w_min}")
    coh = _factor(c_coh_per_candidate, "c_coh")
    hist = _factor(c_hist_per_candidate, "c_hist")
    gen = _factor(c_gen_per_candidate, "c_gen")
    try:
        coh, hist, gen = np.broadcast_arrays(coh, hist, gen)
    except ValueError as e:
        raise ValueError(f"factor shapes do not match: {coh.shape}, {hist.shape}, {gen.shape}") from e

    def power(x: np.ndarray, e: float) -> np.ndarray:
        return np.ones_like(x) if e == 0 else np.power(x, e)

    w = power(coh, alpha) * power(hist, beta) * power(gen, gamma)
    return np.clip(w, w_min, 1.0)
