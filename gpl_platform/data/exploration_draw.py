"""The exploration slice of the benchmark sources (``exploration_share``; docs/DATA_CONTRACT.md).

On every day a share of the requests, chosen at random, is served by the uniform-random policy
instead of the source's exposure policy: it shows as many candidates as the production policy would
(the same ``exposed_counts``), a uniformly random subset of the request's candidates, so each of its
``n`` candidates is shown with probability ``k/n`` (its ``propensity``, on shown and unshown rows alike).
Every draw here comes from streams of its own (salt 29), so a share of 0 leaves the sources' data bit
for bit as they were, and the production policy's own draws never depend on the share.
"""

from __future__ import annotations

import numpy as np

from gpl_platform.data.policies import PRODUCTION_POLICY, UNIFORM_RANDOM_POLICY
from gpl_platform.data.sampling import rank_within_groups

EXPLORATION_SALT = 29
_UNIFORM_DRAW = 1


def exploration_rows(requests: np.ndarray, days: np.ndarray, share: float, seed: int) -> np.ndarray:
    """True on the rows of the requests the uniform-random policy serves.

    ``requests`` are integer request codes, ``days`` each row's UTC day (a request lies within one
    day). Each day explores ``floor(share * requests + u)`` of its requests (``u`` uniform in [0, 1):
    the share exactly on average, and at least one request on every day with ``1/share`` of them or
    more), a uniformly random subset of them. Depends only on the seed, the requests and their days."""
    requests = np.asarray(requests)
    if share <= 0 or len(requests) == 0:
        return np.zeros(len(requests), dtype=bool)
    codes, first, row_code = np.unique(requests, return_index=True, return_inverse=True)
    request_day = np.asarray(days)[first]
    rng = np.random.default_rng([seed, EXPLORATION_SALT])
    rank, _ = rank_within_groups(request_day, rng.random(len(codes)))
    day_values, day_of_request, per_day = np.unique(request_day, return_inverse=True, return_counts=True)
    quota = np.floor(share * per_day + rng.random(len(day_values))).astype(np.int64)
    return (rank < quota[day_of_request.ravel()])[row_code.ravel()]


def serve_uniformly(
    exposed: np.ndarray,
    propensity: np.ndarray,
    requests: np.ndarray,
    days: np.ndarray,
    n_exposed: np.ndarray,
    explore: np.ndarray | None,
    seed: int,
) -> None:
    """Overwrite ``exposed`` and ``propensity`` (in place) on the ``explore`` rows with the uniform-random
    policy: per request its ``n_exposed`` candidates drawn uniformly without replacement (each day from
    a stream of its own), propensity ``n_exposed / candidates`` on every row of the request."""
    if explore is None or not explore.any():
        return
    rows = np.flatnonzero(explore)
    groups, k, day = np.asarray(requests)[rows], np.asarray(n_exposed)[rows], np.asarray(days)[rows]
    for value in np.unique(day):
        in_day = day == value
        rng = np.random.default_rng([seed, EXPLORATION_SALT, _UNIFORM_DRAW, int(value)])
        # the k largest of i.i.d. uniform keys: a uniformly random k-subset of the request's candidates
        rank, size = rank_within_groups(groups[in_day], rng.random(int(in_day.sum())))
        exposed[rows[in_day]] = rank < k[in_day]
        propensity[rows[in_day]] = np.minimum(k[in_day], size) / size


def policy_names(explore: np.ndarray) -> np.ndarray:
    """The ``logging_policy`` column of rows whose exploration mask is ``explore``."""
    return np.where(explore, UNIFORM_RANDOM_POLICY, PRODUCTION_POLICY).astype(object)


__all__ = ["EXPLORATION_SALT", "exploration_rows", "policy_names", "serve_uniformly"]
