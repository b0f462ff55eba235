"""Teachers that label the unexposed candidates of the distillation baselines (docs/METHOD.md, methods).

GPL labels the unexposed candidates of a request with pseudo-labels from an LLM and its anchors; the
baselines here label the same rows with a model trained on exposed clicks instead:

* **Ranker teacher** (``ranker_distillation``): gradient-boosted trees on the student's features plus
  the ranking features a heavier ranker has (:func:`ranker_features`): smoothed user and item click
  rates, exposure counts, the category's click rate and the user's click rate on the candidate's
  category, all counted from the training window's exposed clicks. A fit row's own statistics leave
  out its whole request (K folds over requests), so its click never encodes its label.
* **UKD teacher** (``ukd``): an exposure-invariant MLP teacher, in :mod:`gpl_platform.prerank.ukd`.

How the evaluation uses them (per seed): exposed rows keep their click with weight 1; unexposed rows
get ``label = teacher.scores[row]`` and weight ``training.distill_weight`` (ranker), times ``ukd.weights[row]``
(UKD).

Nothing here reads oracle labels: only exposed clicks and the validation days' exposed clicks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from gpl_platform.features.schema import SMOOTHING_STRENGTH

log = logging.getLogger(__name__)

#: the columns :func:`ranker_features` appends to the student's
RANKER_COLUMNS = [
    "rk_user_click_rate",
    "rk_user_exposures",
    "rk_item_click_rate",
    "rk_item_exposures",
    "rk_category_click_rate",
    "rk_user_category_click_rate",
    "rk_user_category_exposures",
    "rk_user_category_lift",
]
RATE_PRIOR = SMOOTHING_STRENGTH  # pseudo-exposures of the user, item and category rates, as the feature store's
USER_CATEGORY_PRIOR = 5.0  # pseudo-exposures pulling a user's category rate to the user's own rate
CATEGORY_SEPARATOR = "|"  # multi-valued catalog attributes (MovieLens genres) are stored "a|b"


def auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


# ---- ranking features --------------------------------------------------------------------------


def catalog_item_categories(items: pd.DataFrame, column: str | None = None) -> pd.Series | None:
    """``item_id -> category string`` ("a|b" when multi-valued) from the catalog (the warehouse's ``items``
    table), or None when it has no usable categorical column.

    The feature matrix leaves string attributes out (features/serving.py), so the category comes from the
    catalog. Without ``column``: among the string columns other than ``item_id`` and ``text``, the one
    with the fewest distinct values, at least 2 and at most half the items (a title is one per item and
    says nothing a per-item rate does not)."""
    if column is None:
        best = None
        for name in items.columns:
            if name in ("item_id", "text") or pd.api.types.is_numeric_dtype(items[name]):
                continue
            values = _split_categories(items[name]).explode().dropna()
            distinct = values[values != ""].nunique()
            if 2 <= distinct <= max(2, len(items) // 2) and (best is None or distinct < best[0]):
                best = (distinct, name)
        if best is None:
            return None
        column = best[1]
    return pd.Series(items[column].to_numpy(), index=items["item_id"].astype(str), name=column)


def _split_categories(values: pd.Series) -> pd.Series:
    def split(value) -> list[str]:
        if isinstance(value, list | tuple | np.ndarray):
            return [str(v) for v in value if str(v)]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return []
        return [v for v in str(value).split(CATEGORY_SEPARATOR) if v]

    return values.map(split)


class _Tally:
    """Exposures and clicks per integer key, in total and per fold, so a row's statistics can leave its
    own fold out. Keys < 0 (unknown ids) count nothing and look up as zero."""

    def __init__(self, keys: np.ndarray, folds: np.ndarray, n_folds: int, weights: np.ndarray, clicks: np.ndarray):
        known = keys >= 0
        self.keys, inverse = np.unique(keys[known], return_inverse=True)
        m = len(self.keys)
        slot = folds[known] * m + inverse
        w, c = weights[known], weights[known] * clicks[known]
        self.fold_exposures = np.bincount(slot, weights=w, minlength=n_folds * m).reshape(n_folds, m)
        self.fold_clicks = np.bincount(slot, weights=c, minlength=n_folds * m).reshape(n_folds, m)
        self.exposures, self.clicks = self.fold_exposures.sum(axis=0), self.fold_clicks.sum(axis=0)

    def lookup(self, keys: np.ndarray, folds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(exposures, clicks) of ``keys``: all folds, or all but the row's fold when ``folds`` is given."""
        if len(self.keys) == 0:
            return np.zeros(len(keys)), np.zeros(len(keys))
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = (keys >= 0) & (self.keys[pos] == keys)
        exposures, clicks = self.exposures[pos], self.clicks[pos]
        if folds is not None:
            exposures = exposures - self.fold_exposures[folds, pos]
            clicks = clicks - self.fold_clicks[folds, pos]
        return np.where(found, exposures, 0.0), np.where(found, clicks, 0.0)


@dataclass
class RankerFeatureEncoder:
    """The fitted counts behind :func:`ranker_features`; :meth:`transform` encodes other rows (validation,
    test) with the statistics of every fit row."""

    columns: list[str]  # the student's columns it extends
    n_folds: int
    users: pd.Index
    items: pd.Index
    categories: pd.Index
    item_categories: pd.DataFrame  # (item_id, category code, weight): an item's categories share weight 1
    tallies: dict[str, _Tally] = field(repr=False)

    @property
    def output_columns(self) -> list[str]:
        return [*self.columns, *RANKER_COLUMNS]

    def transform(self, frame: pd.DataFrame, matrix: np.ndarray) -> np.ndarray:
        """``matrix`` (row-aligned with ``frame``, the student's columns) with the ranking features appended,
        from every fit row's clicks: for rows outside the fit frame."""
        return self._with_features(frame, matrix, folds=None)

    def _with_features(self, frame: pd.DataFrame, matrix: np.ndarray, folds: np.ndarray | None) -> np.ndarray:
        if matrix.shape != (len(frame), len(self.columns)):
            raise ValueError(f"matrix is {matrix.shape}, expected ({len(frame)}, {len(self.columns)}) columns")
        extra = self._features(frame, folds)
        return np.hstack([np.asarray(matrix, np.float32), extra.astype(np.float32)])

    def _features(self, frame: pd.DataFrame, folds: np.ndarray | None) -> np.ndarray:
        n = len(frame)
        user = self.users.get_indexer(frame["user_id"].astype(str)).astype(np.int64)
        item = self.items.get_indexer(frame["item_id"].astype(str)).astype(np.int64)
        zero = np.zeros(n, np.int64)
        # out-of-fold counts cover (K-1)/K of the window: scaled back so they read like full counts
        scale = self.n_folds / (self.n_folds - 1) if folds is not None else 1.0

        exposures, clicks = self.tallies["global"].lookup(zero, folds)
        ctr = (clicks + 1.0) / (exposures + 2.0)

        def rate(name: str, keys: np.ndarray, prior_rate: np.ndarray, strength: float):
            e, c = self.tallies[name].lookup(keys, folds)
            return (c + strength * prior_rate) / (e + strength), e * scale

        user_rate, user_exposures = rate("user", user, ctr, RATE_PRIOR)
        item_rate, item_exposures = rate("item", item, ctr, RATE_PRIOR)

        # categories: each row expands to its item's (category, weight) pairs, summed back per row
        pairs = pd.DataFrame({"row": np.arange(n), "item_id": frame["item_id"].astype(str).to_numpy()}).merge(
            self.item_categories, on="item_id", how="inner"
        )
        row, cat, w = pairs["row"].to_numpy(), pairs["category"].to_numpy(np.int64), pairs["weight"].to_numpy()
        pair_folds = folds[row] if folds is not None else None
        e, c = self.tallies["category"].lookup(cat, pair_folds)
        cat_rate = (c + RATE_PRIOR * ctr[row]) / (e + RATE_PRIOR)
        user_cat = np.where(user[row] >= 0, user[row] * max(len(self.categories), 1) + cat, -1)
        e, c = self.tallies["user_category"].lookup(user_cat, pair_folds)
        user_cat_rate = (c + USER_CATEGORY_PRIOR * user_rate[row]) / (e + USER_CATEGORY_PRIOR)
        has_category = np.bincount(row, weights=w, minlength=n) > 0
        # an item without a category: the user's own rate, no lift (trees and MLPs alike need no NaN)
        category_rate = np.where(has_category, np.bincount(row, weights=w * cat_rate, minlength=n), ctr)
        user_category_rate = np.where(has_category, np.bincount(row, weights=w * user_cat_rate, minlength=n), user_rate)
        user_category_exposures = np.bincount(row, weights=w * e, minlength=n) * scale
        lift = np.log(user_category_rate / user_rate)
        return np.column_stack(
            [
                user_rate,
                user_exposures,
                item_rate,
                item_exposures,
                category_rate,
                user_category_rate,
                user_category_exposures,
                lift,
            ]
        )


def ranker_features(
    train: pd.DataFrame,
    matrix: np.ndarray,
    columns: list[str],
    fit_rows: np.ndarray,
    *,
    item_categories: pd.Series | None = None,
    n_folds: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, list[str], RankerFeatureEncoder]:
    """The student's features of every ``train`` row plus :data:`RANKER_COLUMNS`, counted from the exposed
    clicks of ``fit_rows`` (a boolean mask or positions into ``train``).

    Requests are split into ``n_folds`` folds; every row of ``train`` is encoded from the fit rows of the
    other folds, so neither a fit row's click nor any click of its request enters its own features (and
    the unexposed rows the teacher labels are encoded exactly like the rows it learned from). Returns
    (float32 matrix, its columns, the encoder whose ``transform`` encodes validation/test rows from all
    fit rows). ``item_categories``: ``item_id -> category`` (see :func:`catalog_item_categories`); without
    it the category features fall back to the user's rate and a lift of 0."""
    if n_folds < 2:
        raise ValueError("n_folds must be >= 2: a row's statistics must leave its own fold out")
    fit = np.zeros(len(train), bool)
    fit[fit_rows] = True
    clicked = train["clicked"].to_numpy(float)
    if np.isnan(clicked[fit]).any():
        raise ValueError("fit rows must have a click (0/1): pass exposed rows")
    request_codes, requests = pd.factorize(train["request_id"])
    folds = np.random.default_rng([seed, 409]).integers(0, n_folds, len(requests))[request_codes]

    users = pd.Index(pd.unique(train["user_id"].astype(str)))
    items = pd.Index(pd.unique(train["item_id"].astype(str)))
    if item_categories is not None and len(item_categories):
        split = _split_categories(pd.Series(item_categories.to_numpy(), index=item_categories.index.astype(str)))
        exploded = split.explode().dropna()
        pairs = pd.DataFrame({"item_id": exploded.index.to_numpy(), "name": exploded.to_numpy()}).drop_duplicates()
        categories = pd.Index(sorted(pairs["name"].unique()))
        item_cats = pd.DataFrame(
            {
                "item_id": pairs["item_id"].to_numpy(),
                "category": categories.get_indexer(pairs["name"].to_numpy()),
                "weight": 1.0 / pairs.groupby("item_id")["name"].transform("size").to_numpy(),
            }
        )
    else:
        categories = pd.Index([])
        item_cats = pd.DataFrame({"item_id": pd.Series([], dtype=str), "category": [], "weight": []})

    fit_frame = train[fit]
    fit_folds, fit_clicks = folds[fit], clicked[fit]
    user_codes = users.get_indexer(fit_frame["user_id"].astype(str)).astype(np.int64)
    item_codes = items.get_indexer(fit_frame["item_id"].astype(str)).astype(np.int64)
    ones = np.ones(len(fit_frame))
    tallies = {
        "global": _Tally(np.zeros(len(fit_frame), np.int64), fit_folds, n_folds, ones, fit_clicks),
        "user": _Tally(user_codes, fit_folds, n_folds, ones, fit_clicks),
        "item": _Tally(item_codes, fit_folds, n_folds, ones, fit_clicks),
    }
    pairs = pd.DataFrame({"fit": np.arange(len(fit_frame)), "item_id": fit_frame["item_id"].astype(str).to_numpy()})
    pairs = pairs.merge(item_cats, on="item_id", how="inner")
    k, cat, w = pairs["fit"].to_numpy(), pairs["category"].to_numpy(np.int64), pairs["weight"].to_numpy()
    tallies["category"] = _Tally(cat, fit_folds[k], n_folds, w, fit_clicks[k])
    user_cat = user_codes[k] * max(len(categories), 1) + cat
    tallies["user_category"] = _Tally(user_cat, fit_folds[k], n_folds, w, fit_clicks[k])

    encoder = RankerFeatureEncoder(
        list(columns),
        n_folds,
        users,
        items,
        categories,
        item_cats,
        tallies,
    )
    return encoder._with_features(train, matrix, folds), encoder.output_columns, encoder


# ---- the ranker teacher ------------------------------------------------------------------------


@dataclass
class RankerTeacher:
    """Gradient-boosted trees on :func:`ranker_features`, trained on the exposed clicks."""

    model: object  # sklearn HistGradientBoostingClassifier
    encoder: RankerFeatureEncoder
    scores: np.ndarray  # P(click) of every train row (out-of-fold features): the unexposed rows' labels
    valid_auc: float  # on the validation days' exposed clicks (nan without both classes)
    n_iter: int  # boosting iterations kept by early stopping
    seconds: float
    settings: dict

    def predict(self, frame: pd.DataFrame, matrix: np.ndarray) -> np.ndarray:
        """P(click) of rows outside the training frame (``matrix`` in the student's columns)."""
        with threadpool_limits(limits=self.settings.get("threads")):
            return self.model.predict_proba(self.encoder.transform(frame, matrix))[:, 1]


def fit_ranker_teacher(
    train: pd.DataFrame,
    train_x: np.ndarray,
    columns: list[str],
    valid: pd.DataFrame,
    valid_x: np.ndarray,
    seed: int,
    *,
    item_categories: pd.Series | None = None,
    n_folds: int = 5,
    max_iter: int = 500,
    learning_rate: float = 0.05,
    max_leaf_nodes: int = 31,
    min_samples_leaf: int = 40,
    l2_regularization: float = 1.0,
    validation_fraction: float = 0.15,
    n_iter_no_change: int = 30,
    threads: int | None = 1,
) -> RankerTeacher:
    """The ranker of ``ranker_distillation``: HistGradientBoosting on the student's features plus the
    ranking features, trained on the exposed clicks of ``train``, its iterations chosen by early stopping
    on a held-out part of those exposed rows (the validation days stay out of fitting; their exposed
    clicks only give ``valid_auc``). ``valid``/``valid_x``: the validation days' frame and matrix.

    ``threads``: OpenMP threads of the trees (None: the library's default, every core). One by default:
    boosting synchronizes its threads many times per iteration, and on shared cores they wait for each
    other far longer than they save (seen here: 130 s with 2 threads, 5 s with 1, same fit)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    started = time.perf_counter()
    trees = {
        "max_iter": max_iter,
        "learning_rate": learning_rate,
        "max_leaf_nodes": max_leaf_nodes,
        "min_samples_leaf": min_samples_leaf,
        "l2_regularization": l2_regularization,
        "validation_fraction": validation_fraction,
        "n_iter_no_change": n_iter_no_change,
    }
    settings = {
        "n_folds": n_folds,
        **trees,
        "threads": threads,
        "item_category": None if item_categories is None else item_categories.name,
    }
    exposed = train["exposed"].to_numpy(bool)
    features, _, encoder = ranker_features(
        train, train_x, columns, exposed, item_categories=item_categories, n_folds=n_folds, seed=seed
    )
    with threadpool_limits(limits=threads):
        model = HistGradientBoostingClassifier(**trees, early_stopping=True, scoring="loss", random_state=seed)
        model.fit(features[exposed], train["clicked"].to_numpy(float)[exposed].astype(int))
        scores = model.predict_proba(features)[:, 1]
    teacher = RankerTeacher(model, encoder, scores, float("nan"), int(model.n_iter_), 0.0, settings)
    valid_exposed = valid["exposed"].to_numpy(bool)
    if valid_exposed.any():
        valid_scores = teacher.predict(valid[valid_exposed], valid_x[valid_exposed])
        teacher.valid_auc = auc_or_nan(valid.loc[valid_exposed, "clicked"].to_numpy(float).astype(int), valid_scores)
    teacher.seconds = time.perf_counter() - started
    log.info(
        "ranker teacher: %d iterations, valid AUC %.4f (%.1fs)", teacher.n_iter, teacher.valid_auc, teacher.seconds
    )
    return teacher
