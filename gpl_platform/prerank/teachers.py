"""Teachers that label the unexposed candidates of the distillation baselines (docs/METHOD.md, methods).

GPL labels the unexposed candidates of a request with pseudo-labels from an LLM and its anchors; the
baselines here label the same rows with a model trained on exposed clicks instead:

* **Ranker teacher** (``ranker_distillation``): gradient-boosted trees on the student's features plus
  the ranking features a heavier ranker has (:func:`ranker_features`): smoothed user and item click
  rates, exposure counts, the category's click rate and the user's click rate on the candidate's
  category, all counted from the training window's exposed clicks. A fit row's own statistics leave
  out its whole request (K folds over requests), so its click never encodes its label.
* **UKD teacher** (``ukd``; after Xu et al., WWW 2022, "UKD: Debiasing Conversion Rate Estimation via
  Uncertainty-regularized Knowledge Distillation"): an MLP whose shared representation feeds a click
  head (trained on exposed rows) and, through a gradient-reversal layer, an exposed-vs-unexposed
  discriminator (trained on all rows). The encoder is pushed to make exposure unpredictable, so what
  the click head learned on exposed rows transfers to unexposed ones. Its mean score over MC-dropout
  passes is the soft label of an unexposed row, and the passes' variance lowers the row's weight
  (``exp(-variance / temperature)``, normalized to mean 1 over the unexposed rows). The paper models
  the uncertainty inside the student; here it is the teacher's, so the student keeps its usual trainer.

How the evaluation uses them (per seed): exposed rows keep their click with weight 1; unexposed rows
get ``label = teacher.scores[row]`` and weight ``training.distill_weight`` (ranker), times ``ukd.weights[row]``
(UKD).

Nothing here reads oracle labels: only exposed clicks and the validation days' exposed clicks.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F

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
TEMPERATURE_QUANTILE = 0.9  # default UKD temperature: this quantile of the unexposed rows' MC variance
CATEGORY_SEPARATOR = "|"  # multi-valued catalog attributes (MovieLens genres) are stored "a|b"


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
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
        teacher.valid_auc = _auc(valid.loc[valid_exposed, "clicked"].to_numpy(float).astype(int), valid_scores)
    teacher.seconds = time.perf_counter() - started
    log.info(
        "ranker teacher: %d iterations, valid AUC %.4f (%.1fs)", teacher.n_iter, teacher.valid_auc, teacher.seconds
    )
    return teacher


# ---- the UKD teacher ---------------------------------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-strength`` backward: the discriminator learns to tell
    exposed from unexposed while the encoder below it learns to make that impossible."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


class _UkdNet(nn.Module):
    """Shared encoder -> click head, and encoder -> gradient reversal -> exposure discriminator.

    Dropout only comes after the first layer, so MC-dropout passes compute that (widest) layer once
    (:meth:`first_layer`) and redraw only the cheap stochastic rest."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.first = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU())
        self.rest = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
        self.click_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.discriminator = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        # the counts are heavy-tailed: signed log1p before standardizing (as the pre-ranker does)
        return self.first((torch.sign(x) * torch.log1p(x.abs()) - self.mean) / self.std)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first_layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.click_head(self.represent(x)).squeeze(-1)

    def click_from_first(self, h: torch.Tensor) -> torch.Tensor:
        return self.click_head(self.rest(h)).squeeze(-1)


@dataclass
class UkdSettings:
    hidden: int = 64
    dropout: float = 0.2
    adv_weight: float = 1.0  # gradient-reversal strength after the ramp; 0: the discriminator cannot shape the encoder
    ramp_steps: int = 200  # the reversal grows from 0 to adv_weight over these steps (DANN's schedule)
    discriminator_steps: int = 2  # adversary-only updates on each batch before the joint step
    steps: int = 1500  # maximum optimizer steps
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-5
    eval_every: int = 50
    patience: int = 6  # evaluations without a better validation AUC before stopping
    mc_passes: int = 20
    temperature: float | None = None  # None: the unexposed rows' MC variance at TEMPERATURE_QUANTILE
    probe_rows: int = 10000  # at most this many rows, half exposed, probe the final representation
    threads: int | None = 1  # torch intra-op threads while fitting (None: leave torch's setting)


@dataclass
class UkdTeacher:
    """What :func:`fit_ukd_teacher` gives the ``ukd`` method: labels and weights per train row."""

    scores: np.ndarray  # MC-dropout mean P(click) of every train row: the unexposed rows' soft labels
    variance: np.ndarray  # MC-dropout variance of that probability, every train row
    weights: np.ndarray  # uncertainty weight per train row: unexposed rows mean 1, exposed rows 1
    valid_auc: float  # the kept checkpoint's AUC on the validation exposed clicks
    discriminator_auc: float  # a fresh linear probe's held-out AUC of exposed vs unexposed on the representation
    adversary_auc: float  # the jointly trained discriminator's AUC on the same held-out rows
    best_step: int
    steps_run: int
    temperature: float
    seconds: float
    settings: dict


def _standardization(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of signed-log1p ``x`` per column, in chunks (no float64 copy of the whole matrix)."""
    total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        z = np.asarray(x[start : start + chunk], dtype=np.float64)
        z = np.sign(z) * np.log1p(np.abs(z))
        total += z.sum(axis=0)
        total_sq += (z**2).sum(axis=0)
    mean = total / len(x)
    std = np.sqrt(np.maximum(total_sq / len(x) - mean**2, 0.0))
    # a constant column: std 1, so it enters as 0 instead of exploding on another value
    return mean, np.where(std < 1e-6, 1.0, std)


_CHUNK = 8192


def _predict(net: _UkdNet, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(net(x[s : s + _CHUNK])).numpy() for s in range(0, len(x), _CHUNK)])


def fit_ukd_teacher(
    train_x: np.ndarray,
    exposed: np.ndarray,
    clicked: np.ndarray,
    valid_x: np.ndarray,
    valid_clicked: np.ndarray,
    seed: int,
    *,
    hidden: int = 64,
    dropout: float = 0.2,
    adv_weight: float = 1.0,
    ramp_steps: int = 200,
    discriminator_steps: int = 2,
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    eval_every: int = 50,
    patience: int = 6,
    mc_passes: int = 20,
    temperature: float | None = None,
    probe_rows: int = 10000,
    threads: int | None = 1,
) -> UkdTeacher:
    """The UKD teacher of the ``ukd`` method (module docstring).

    ``train_x``: every training candidate's features; ``exposed`` its mask; ``clicked`` the clicks (read on
    exposed rows only; NaN elsewhere is fine). ``valid_x``/``valid_clicked``: the validation days' exposed
    rows and their clicks, for early stopping. Any feature matrix works: :func:`ranker_features`' (with
    ``encoder.transform`` for the validation rows) gives this teacher the ranker teacher's inputs.

    Each step draws a batch of exposed rows for the click loss and a balanced batch (half exposed, half
    unexposed) for the discriminator, which first takes ``discriminator_steps`` updates of its own on it;
    its reversed gradient then reaches the encoder with a strength ramped from 0 to ``adv_weight`` over
    ``ramp_steps``. Checkpoints count from the end of the ramp on (the kept teacher trained under the full
    reversal); the one with the best validation AUC is kept. Deterministic given ``seed``; torch's global
    random state and thread count are restored afterwards. ``threads=1``: a 64-unit MLP gains little from
    intra-op threads and loses much when the cores are shared."""
    settings = UkdSettings(
        hidden=hidden,
        dropout=dropout,
        adv_weight=adv_weight,
        ramp_steps=ramp_steps,
        discriminator_steps=discriminator_steps,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        eval_every=eval_every,
        patience=patience,
        mc_passes=mc_passes,
        temperature=temperature,
        probe_rows=probe_rows,
        threads=threads,
    )
    if ramp_steps >= steps:
        raise ValueError(f"ramp_steps ({ramp_steps}) must be below steps ({steps}): no checkpoint would count")
    exposed = np.asarray(exposed, bool)
    if exposed.all() or not exposed.any():
        raise ValueError("the UKD teacher needs exposed and unexposed rows")
    labels = np.asarray(clicked, float)[exposed]
    if np.isnan(labels).any():
        raise ValueError("every exposed row needs a click (0/1)")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            result = _fit_ukd(train_x, exposed, labels, valid_x, np.asarray(valid_clicked, int), seed, settings)
    finally:
        torch.set_num_threads(previous_threads)
    result.seconds = time.perf_counter() - started
    log.info(
        "UKD teacher: step %d/%d, valid AUC %.4f, exposure probe AUC %.4f (adv_weight %.2f, %.1fs)",
        result.best_step,
        result.steps_run,
        result.valid_auc,
        result.discriminator_auc,
        adv_weight,
        result.seconds,
    )
    return result


def _fit_ukd(train_x, exposed, labels, valid_x, valid_clicked, seed: int, s: UkdSettings) -> UkdTeacher:
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    vx = torch.from_numpy(np.ascontiguousarray(valid_x, dtype=np.float32))
    mean, std = _standardization(train_x)
    net = _UkdNet(mean, std, s.hidden, s.dropout)
    adversary = net.discriminator.parameters()
    learner = [p for name, p in net.named_parameters() if not name.startswith("discriminator.")]
    optimizer = torch.optim.Adam(learner, lr=s.lr, weight_decay=s.weight_decay)
    adversary_optimizer = torch.optim.Adam(adversary, lr=s.lr)
    generator = torch.Generator().manual_seed(seed)
    idx_exposed = torch.from_numpy(np.flatnonzero(exposed))
    idx_unexposed = torch.from_numpy(np.flatnonzero(~exposed))
    y = torch.zeros(len(train_x))
    y[idx_exposed] = torch.from_numpy(labels.astype(np.float32))
    half = max(s.batch_size // 2, 1)
    domain = torch.cat([torch.ones(half), torch.zeros(half)])

    def draw(pool: torch.Tensor, n: int) -> torch.Tensor:
        return pool[torch.randint(len(pool), (n,), generator=generator)]

    best_auc, best_state, best_step, stale, step = -np.inf, None, 0, 0, 0
    for step in range(1, s.steps + 1):
        net.train()
        rows = draw(idx_exposed, s.batch_size)
        click_loss = F.binary_cross_entropy_with_logits(net(x[rows]), y[rows])
        # the reversal grows from 0 so the encoder first learns what predicts a click
        strength = s.adv_weight * (2.0 / (1.0 + np.exp(-10.0 * min(step / s.ramp_steps, 1.0))) - 1.0)
        both = torch.cat([draw(idx_exposed, half), draw(idx_unexposed, half)])
        representation = net.represent(x[both])
        # the adversary first catches up on this batch alone: reversing the gradient of a stale adversary
        # only teaches the encoder to fool that one, not to drop what tells exposure apart
        for _ in range(s.discriminator_steps):
            adversary_optimizer.zero_grad()
            logit = net.discriminator(representation.detach()).squeeze(-1)
            F.binary_cross_entropy_with_logits(logit, domain).backward()
            adversary_optimizer.step()
        logit = net.discriminator(_ReverseGradient.apply(representation, float(strength))).squeeze(-1)
        domain_loss = F.binary_cross_entropy_with_logits(logit, domain)
        optimizer.zero_grad()
        adversary_optimizer.zero_grad()
        (click_loss + domain_loss).backward()
        optimizer.step()
        adversary_optimizer.step()
        if step < s.ramp_steps or (step % s.eval_every and step != s.steps):
            continue
        net.eval()
        auc = _auc(valid_clicked, _predict(net, vx)) if len(vx) else float("nan")
        if best_state is None or np.isnan(auc) or auc > best_auc:
            best_auc, best_state, best_step, stale = auc, copy.deepcopy(net.state_dict()), step, 0
        else:
            stale += 1
            if stale >= s.patience:
                break
    net.load_state_dict(best_state)

    # MC dropout: dropout stays on, so each pass is a draw from the teacher's uncertainty; the first
    # layer is deterministic and computed once
    with torch.no_grad():
        net.eval()
        first = torch.cat([net.first_layer(x[r : r + _CHUNK]) for r in range(0, len(x), _CHUNK)])
        net.train()
        passes = np.stack(
            [
                np.concatenate(
                    [
                        torch.sigmoid(net.click_from_first(first[r : r + _CHUNK])).numpy()
                        for r in range(0, len(x), _CHUNK)
                    ]
                )
                for _ in range(s.mc_passes)
            ]
        )
    scores, variance = passes.mean(axis=0), passes.var(axis=0)
    # the variance is heavy-tailed: scaled by a high quantile, most rows keep a weight above e^-1 and only
    # the most uncertain tail decays towards 0 (the mean would zero out every row far above it)
    temperature = s.temperature or float(max(np.quantile(variance[~exposed], TEMPERATURE_QUANTILE), 1e-12))
    raw = np.exp(-variance / temperature)
    weights = np.ones(len(train_x))
    weights[~exposed] = raw[~exposed] / raw[~exposed].mean()

    net.eval()
    probe_auc, adversary_auc = _exposure_probe(net, x, idx_exposed, idx_unexposed, s.probe_rows, seed)
    return UkdTeacher(
        scores=scores,
        variance=variance,
        weights=weights,
        valid_auc=float(best_auc),
        discriminator_auc=probe_auc,
        adversary_auc=adversary_auc,
        best_step=best_step,
        steps_run=step,
        temperature=temperature,
        seconds=0.0,
        settings=asdict(s),
    )


def _exposure_probe(
    net: _UkdNet, x: torch.Tensor, idx_exposed: torch.Tensor, idx_unexposed: torch.Tensor, n_rows: int, seed: int
) -> tuple[float, float]:
    """How well exposure can still be read from the representation: a fresh logistic regression fitted on
    half of a balanced sample of rows, its AUC on the other half (0.5: invariant); and the adversary's own
    AUC on that half. A fresh probe, because an adversary trained against a moving encoder can be fooled
    while the information is still there."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng([seed, 811])
    per_side = min(len(idx_exposed), len(idx_unexposed), max(n_rows // 2, 2))
    rows = np.concatenate(
        [
            rng.choice(idx_exposed.numpy(), per_side, replace=False),
            rng.choice(idx_unexposed.numpy(), per_side, replace=False),
        ]
    )
    domain = np.r_[np.ones(per_side), np.zeros(per_side)].astype(int)
    order = rng.permutation(len(rows))
    rows, domain = rows[order], domain[order]
    with torch.no_grad():
        rep = torch.cat([net.represent(x[torch.from_numpy(rows[r : r + _CHUNK])]) for r in range(0, len(rows), _CHUNK)])
        adversary = net.discriminator(rep).squeeze(-1).numpy()
    rep = rep.numpy().astype(np.float64)
    fit, held = slice(0, len(rows) // 2), slice(len(rows) // 2, None)
    mu, sd = rep[fit].mean(axis=0), rep[fit].std(axis=0) + 1e-6
    with threadpool_limits(limits=1):  # a small fit: BLAS threads only spin when the cores are shared
        probe = LogisticRegression(max_iter=1000).fit((rep[fit] - mu) / sd, domain[fit])
    probe_auc = _auc(domain[held], probe.decision_function((rep[held] - mu) / sd))
    return probe_auc, _auc(domain[held], adversary[held])
