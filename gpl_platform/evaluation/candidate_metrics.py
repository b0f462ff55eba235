"""The metrics of one pre-ranker on a split's candidates: the whole test candidate set and its segments
(exposed, unexposed, long-tail items, items by their exposure history in training), and the validation days'
metrics the early stopping and the tuning read. Their formulas: :mod:`gpl_platform.evaluation.metrics`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpl_platform.evaluation.metrics import auc, coverage_at_k, diversity_at_k, gauc, hit_rate_at_k

METRICS = (
    "auc",
    "gauc",
    "hr@3",
    "hr@5",
    "hr@10",
    "unexposed_gauc",
    "unexposed_auc",
    "unexposed_hr@10",
    "longtail_hr@10",
    "coverage@10",
    "diversity@10",
    "exposed_auc",
    "never_exposed_auc",
    "rarely_exposed_auc",
    "often_exposed_auc",
    "valid_auc",
    "valid_unexposed_gauc",
    "valid_unexposed_auc",
    "valid_unexposed_hr@10",
)


ITEM_SEGMENTS = ("never", "rarely", "often")


def long_tail_items(train: pd.DataFrame, head_share: float = 0.8) -> set[str]:
    """Items outside the smallest head set holding ``head_share`` of the training days' exposures."""
    exposures = train[train["exposed"]].groupby("item_id").size().sort_values(ascending=False)
    cum = exposures.cumsum() / exposures.sum()
    head = set(exposures.index[: int(np.searchsorted(cum.to_numpy(), head_share)) + 1])
    return set(train["item_id"].unique()) - head


def item_exposure_segments(items: pd.Series, exposures: pd.Series, rare_max: int) -> np.ndarray:
    """never / rarely (1..rare_max) / often: how often each item was exposed in the training days."""
    count = items.map(exposures).fillna(0).to_numpy()
    return np.where(count == 0, "never", np.where(count <= rare_max, "rarely", "often"))


def candidate_set_metrics(test: pd.DataFrame, scores: np.ndarray, longtail: set[str], item_vectors: dict) -> dict:
    """Test metrics over the whole candidate set (``test`` has ``oracle_label``, ``exposed`` and an
    ``item_segment`` column from :func:`item_exposure_segments`)."""
    y = test["oracle_label"].to_numpy(int)
    req, users, items = test["request_id"].to_numpy(), test["user_id"].to_numpy(), test["item_id"].to_numpy()
    unexp = ~test["exposed"].to_numpy(bool)
    tail = test["item_id"].isin(longtail).to_numpy()
    segment = test["item_segment"].to_numpy()
    return {
        "auc": auc(y, scores),
        "gauc": gauc(users, y, scores),
        "hr@3": hit_rate_at_k(req, y, scores, 3),
        "hr@5": hit_rate_at_k(req, y, scores, 5),
        "hr@10": hit_rate_at_k(req, y, scores, 10),
        # the pre-ranker's own job: ordering the unexposed candidates of each request
        "unexposed_gauc": gauc(req[unexp], y[unexp], scores[unexp]),
        "unexposed_auc": auc(y[unexp], scores[unexp]),
        "unexposed_hr@10": hit_rate_at_k(req[unexp], y[unexp], scores[unexp], 10),
        "longtail_hr@10": hit_rate_at_k(req[tail], y[tail], scores[tail], 10),
        "coverage@10": coverage_at_k(req, items, scores, 10),
        "diversity@10": diversity_at_k(req, items, scores, item_vectors, 10),
        "exposed_auc": auc(y[~unexp], scores[~unexp]),
        **{f"{name}_exposed_auc": auc(y[segment == name], scores[segment == name]) for name in ITEM_SEGMENTS},
    }


def validation_metrics(valid: pd.DataFrame, scores: np.ndarray) -> dict:
    """The metrics defaults are chosen on: validation days, every candidate, against the oracle."""
    y = valid["oracle_label"].to_numpy(int)
    unexp = ~valid["exposed"].to_numpy(bool)
    req = valid["request_id"].to_numpy()
    return {
        "valid_auc": auc(y, scores),
        "valid_unexposed_gauc": gauc(req[unexp], y[unexp], scores[unexp]),
        "valid_unexposed_auc": auc(y[unexp], scores[unexp]),
        "valid_unexposed_hr@10": hit_rate_at_k(req[unexp], y[unexp], scores[unexp], 10),
    }
