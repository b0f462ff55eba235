"""Exposure policies of the simulated logging system: which recalled candidates a request shows.

The sources (MovieLens protocol, simulator) call :func:`expose` once their candidates and true
labels exist. Three policies (``ExposurePolicyConfig``, docs/EVALUATION.md):

* ``popularity``: Plackett-Luce by ``(pop(i) + offset)^power`` over each request, independent of what
  the user wants. Drawn in one pass with the source's own random stream, exactly as the first
  protocol did, so its data sets are reproduced bit for bit.
* ``logging``: the feedback loop of a production cascade. Day by day, a logging model (logistic
  regression on what a ranker knows from its own logs: item click-through, item exposure count,
  the user's clicked-category profile, the user's click-through) trained only on the *exposed
  clicks of earlier days* scores every candidate; a request shows its top-k under Gumbel noise
  with log-weight ``logit / temperature``. Before a first model can be fitted, popularity decides
  (cold start). Only exposed rows' labels are ever revealed to the logging model, so nothing it
  learns comes from an unexposed label, and nothing of day D or later shapes day D's exposure.
* ``self_selection``: the popularity policy plus a fixed bonus on the log-odds of candidates whose
  true label is 1 (the classic missing-not-at-random setup).

Every candidate gets its true exposure probability under the policy that served its day
(``propensity``), estimated by drawing the same Plackett-Luce top-k many times. A source's exploration
slice (``exploration_share``) is served by the uniform-random policy instead (gpl_platform/data/exploration_draw.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from gpl_platform.data.exploration_draw import serve_uniformly
from gpl_platform.data.sampling import rank_within_groups
from gpl_platform.source_settings import ExposurePolicyConfig

log = logging.getLogger(__name__)

# Prior strengths of the logging model's smoothed rates (pseudo-counts).
RATE_PRIOR = 10.0
CATEGORY_PRIOR = 5.0
# Salts that give each day its own random streams, so one day's draws never depend on another's data.
_DRAW_SALT, _PROPENSITY_SALT = 7919, 7927


@dataclass(frozen=True)
class Candidates:
    """A source's recalled candidates as integer codes (any row order).

    ``request`` codes are 0..R-1, ``user`` and ``item`` index the source's user and item arrays,
    ``day`` is the UTC day as days since 1970-01-01. A request lies within one day."""

    request: np.ndarray
    user: np.ndarray
    item: np.ndarray
    day: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.request)
        for name in ("user", "item", "day"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"candidates: {name} has {len(getattr(self, name))} rows, request has {n}")


@dataclass
class Exposure:
    exposed: np.ndarray  # bool per candidate
    propensity: np.ndarray  # P(exposed) under the policy that served the candidate's day
    info: dict = field(default_factory=dict)


def exposed_counts(groups: np.ndarray, share: float, max_per_request: int | None) -> np.ndarray:
    """Per row: how many candidates its request shows, ceil(share * size) capped at max_per_request."""
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    n = np.ceil(share * sizes[inverse.ravel()]).astype(np.int64)  # the first protocol's rounding, kept
    return np.minimum(n, max_per_request) if max_per_request else n


def draw_top_n(
    rng: np.random.Generator, groups: np.ndarray, log_weights: np.ndarray, n_exposed: np.ndarray
) -> np.ndarray:
    """One Plackett-Luce draw per group: the ``n_exposed`` rows with the largest log-weight + Gumbel."""
    if len(groups) == 0:
        return np.zeros(0, dtype=bool)
    rank, _ = rank_within_groups(groups, log_weights + rng.gumbel(size=len(groups)))
    return rank < n_exposed


def inclusion_probability(
    rng: np.random.Generator, groups: np.ndarray, log_weights: np.ndarray, n_exposed: np.ndarray, samples: int
) -> np.ndarray:
    """P(row in its group's top-n) under Plackett-Luce with these log-weights, by ``samples`` draws.

    Rows are sorted by group once; each draw is then one argsort of ``group * span - key`` (groups
    stay contiguous because ``span`` exceeds the range of the keys, which are clipped 29 nats
    beyond the log-weights: a Gumbel variate lies there with probability < 1e-12). The estimate is
    floored at half a draw, so that an exposed row never has propensity 0. ``samples`` 0: NaN."""
    n = len(groups)
    if samples <= 0:
        return np.full(n, np.nan)
    if n == 0:
        return np.zeros(0)
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.ravel()
    order = np.argsort(codes, kind="stable")
    codes_s, logw_s, n_s = codes[order], np.asarray(log_weights, float)[order], n_exposed[order]
    starts = np.r_[0, np.flatnonzero(np.diff(codes_s)) + 1]
    start_of_position = np.repeat(starts, np.diff(np.r_[starts, n]))
    low, high = logw_s.min() - 29.0, logw_s.max() + 29.0
    base = codes_s * (high - low + 1.0)
    hits = np.zeros(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    positions = np.arange(n)
    for _ in range(samples):
        keys = np.clip(logw_s + rng.gumbel(size=n), low, high)
        rank[np.argsort(base - keys)] = positions - start_of_position
        hits += rank < n_s
    out = np.empty(n)
    out[order] = np.maximum(hits / samples, 0.5 / samples)
    return out


def popularity_log_weights(popularity: np.ndarray, power: float, offset: float = 1.0) -> np.ndarray:
    """log((pop + offset)^power) per item: the popularity policy's and the cold start's log-weights."""
    # log of the power (not power * log): the first protocol's arithmetic, so its draws are reproduced
    return np.log(np.power(np.asarray(popularity, dtype=float) + offset, power))


# ---- the logging model ------------------------------------------------------------------------


class LoggedCounts:
    """What the logging system has seen so far: exposures and clicks per item, per user and per
    (user, category). Only exposed rows with their revealed clicks are ever added."""

    def __init__(self, n_users: int, n_items: int, categories: np.ndarray):
        self.categories = np.asarray(categories, dtype=np.float64)  # (items, C), rows sum to 1 or 0
        if self.categories.shape[0] != n_items:
            raise ValueError(f"categories have {self.categories.shape[0]} rows for {n_items} items")
        n_cat = self.categories.shape[1]
        self.item_exp, self.item_clk = np.zeros(n_items), np.zeros(n_items)
        self.user_exp, self.user_clk = np.zeros(n_users), np.zeros(n_users)
        self.user_cat_clk = np.zeros((n_users, n_cat))

    def add(self, users: np.ndarray, items: np.ndarray, clicks: np.ndarray) -> None:
        clicks = np.asarray(clicks, dtype=float)
        np.add.at(self.item_exp, items, 1.0)
        np.add.at(self.item_clk, items, clicks)
        np.add.at(self.user_exp, users, 1.0)
        np.add.at(self.user_clk, users, clicks)
        np.add.at(self.user_cat_clk, users, self.categories[items] * clicks[:, None])

    def features(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(n, 4): item CTR log-odds, log1p item exposures, user-category affinity, user CTR log-odds.

        Rates are smoothed towards the global CTR; the affinity is the log-lift of the user's click
        share on the item's categories over the categories' share of all clicks (0 without clicks)."""
        total_exp, total_clk = self.item_exp.sum(), self.item_clk.sum()
        g = (total_clk + 1.0) / (total_exp + 2.0)
        item_ctr = (self.item_clk[items] + RATE_PRIOR * g) / (self.item_exp[items] + RATE_PRIOR)
        user_ctr = (self.user_clk[users] + RATE_PRIOR * g) / (self.user_exp[users] + RATE_PRIOR)
        cat_clk = self.user_cat_clk.sum(axis=0)
        share = (cat_clk + 1.0) / (cat_clk.sum() + len(cat_clk))
        per_user = self.user_cat_clk[users]
        lift = np.log(
            (per_user + CATEGORY_PRIOR * share) / (per_user.sum(axis=1, keepdims=True) + CATEGORY_PRIOR)
        ) - np.log(share)
        affinity = np.einsum("ij,ij->i", lift, self.categories[items])
        return np.column_stack([_logit(item_ctr), np.log1p(self.item_exp[items]), affinity, _logit(user_ctr)])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


LOGGING_FEATURES = ("item_ctr_logodds", "item_log_exposures", "user_category_affinity", "user_ctr_logodds")


@dataclass
class LoggingModel:
    """Logistic regression on :meth:`LoggedCounts.features`, fitted on exposed rows and their clicks."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    fitted_day: int
    n_rows: int

    @classmethod
    def fit(cls, features: np.ndarray, clicks: np.ndarray, day: int) -> LoggingModel:
        from sklearn.linear_model import LogisticRegression

        mean, scale = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
        model = LogisticRegression(C=1.0, max_iter=500).fit((features - mean) / scale, clicks)
        return cls(mean, scale, model.coef_[0], float(model.intercept_[0]), day, len(clicks))

    def logit(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.coef + self.intercept

    def describe(self) -> dict:
        return {
            "day": str(np.datetime64(self.fitted_day, "D")),
            "rows": self.n_rows,
            "coef": {n: round(float(c), 4) for n, c in zip(LOGGING_FEATURES, self.coef)},
            "intercept": round(self.intercept, 4),
        }


# ---- the policies ---------------------------------------------------------------------------


def expose(
    candidates: Candidates,
    labels: np.ndarray,
    popularity: np.ndarray,
    categories: np.ndarray,
    share: float,
    popularity_power: float,
    cfg: ExposurePolicyConfig,
    seed: int,
    rng: np.random.Generator,
    popularity_offset: float = 1.0,
    explore: np.ndarray | None = None,
) -> Exposure:
    """Exposure and true propensity of every candidate under ``cfg.policy``.

    ``labels`` are the true labels: the policies reveal them only for exposed rows (as clicks), except
    ``self_selection``, whose exposure depends on them by design. ``popularity`` is per item (what
    the logging system knows of popularity); ``categories`` is (items x categories) with rows
    summing to 1 (or 0 for an item without one). ``rng`` is the source's stream, used only by the
    ``popularity`` policy (so the first protocol's draws stay the same); the others draw from
    per-day streams of ``seed``. Popularity weights are ``(popularity + popularity_offset)^power``.
    ``explore``: the rows of the requests the uniform-random policy serves instead (the exploration
    slice, :mod:`gpl_platform.data.exploration_draw`)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(candidates.request):
        raise ValueError(f"{len(labels)} labels for {len(candidates.request)} candidates")
    pop_logw = popularity_log_weights(popularity, popularity_power, popularity_offset)[candidates.item]
    n_exposed = exposed_counts(candidates.request, share, cfg.max_per_request)
    if cfg.policy == "popularity":
        exposed = draw_top_n(rng, candidates.request, pop_logw, n_exposed)
        propensity = inclusion_probability(
            np.random.default_rng([seed, _PROPENSITY_SALT]),
            candidates.request,
            pop_logw,
            n_exposed,
            cfg.propensity_samples,
        )
        serve_uniformly(exposed, propensity, candidates.request, candidates.day, n_exposed, explore, seed)
        return Exposure(exposed, propensity, {"policy": "popularity"})
    return _expose_day_by_day(candidates, labels, pop_logw, n_exposed, categories, len(popularity), cfg, seed, explore)


def _expose_day_by_day(
    candidates: Candidates,
    labels: np.ndarray,
    pop_logw: np.ndarray,
    n_exposed: np.ndarray,
    categories: np.ndarray,
    n_items: int,
    cfg: ExposurePolicyConfig,
    seed: int,
    explore: np.ndarray | None = None,
) -> Exposure:
    n = len(labels)
    exposed, propensity = np.zeros(n, dtype=bool), np.zeros(n)
    n_users = int(candidates.user.max()) + 1 if n else 0
    policy = DailyExposure(n_users, n_items, categories, cfg, seed)
    days = np.unique(candidates.day)
    order = np.argsort(candidates.day, kind="stable")
    bounds = np.searchsorted(candidates.day[order], np.r_[days, days[-1] + 1 if len(days) else 0])
    for k, day in enumerate(days):
        rows = order[bounds[k] : bounds[k + 1]]
        exposed[rows], propensity[rows] = policy.serve(
            int(day),
            candidates.request[rows],
            candidates.user[rows],
            candidates.item[rows],
            labels[rows],
            pop_logw[rows],
            n_exposed[rows],
            None if explore is None else explore[rows],
        )
    return Exposure(exposed, propensity, policy.info())


class DailyExposure:
    """A policy that serves one day at a time, learning only from what it showed: the logging
    system of a source whose later candidates depend on earlier exposure (the simulator's
    co-occurrence recall). Days must come in order. ``popularity`` is served here from per-day
    random streams (the one-pass draw of :func:`expose` keeps the first protocol's data sets)."""

    def __init__(self, n_users: int, n_items: int, categories: np.ndarray, cfg: ExposurePolicyConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.counts = LoggedCounts(n_users, n_items, categories)
        self.logged: list[tuple[int, np.ndarray, np.ndarray]] = []  # (day, features, clicks) of exposed rows
        self.model: LoggingModel | None = None
        self.refits: list[dict] = []
        self.cold_days = 0
        self.first_day: int | None = None
        self.last_day: int | None = None
        self.days = 0

    def serve(
        self,
        day: int,
        requests: np.ndarray,
        users: np.ndarray,
        items: np.ndarray,
        labels: np.ndarray,
        pop_logw: np.ndarray,
        n_exposed: np.ndarray,
        explore: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exposure and true propensity of one day's candidates; their clicks are revealed afterwards.
        ``explore``: the rows the uniform-random policy serves instead (:func:`serve_uniformly`)."""
        cfg = self.cfg
        if self.last_day is not None and day <= self.last_day:
            raise ValueError(f"days must be served in order: day {day} after {self.last_day}")
        if self.first_day is None:
            self.first_day = day
        labels = np.asarray(labels, dtype=np.int64)
        features = self.counts.features(users, items) if cfg.policy == "logging" else None
        if cfg.policy == "logging":
            due = self.model is None or ((day - self.first_day) % cfg.retrain_every_days == 0)
            if due and self.days > 0:
                self.model = _refit(self.model, self.logged, day, cfg) or self.model
                if self.model is not None and self.model.fitted_day == day:
                    self.refits.append(self.model.describe())
            if self.model is None:
                self.cold_days += 1
                logw = pop_logw
            else:
                logw = self.model.logit(features) / cfg.temperature
        elif cfg.policy == "self_selection":
            logw = pop_logw + cfg.self_selection_strength * labels
        else:
            logw = pop_logw
        shown = draw_top_n(np.random.default_rng([self.seed, _DRAW_SALT, day]), requests, logw, n_exposed)
        propensity = inclusion_probability(
            np.random.default_rng([self.seed, _PROPENSITY_SALT, day]), requests, logw, n_exposed, cfg.propensity_samples
        )
        serve_uniformly(shown, propensity, requests, np.full(len(requests), day), n_exposed, explore, seed=self.seed)
        clicks = labels[shown]  # the only labels the logging system ever sees
        self.counts.add(users[shown], items[shown], clicks)
        if features is not None:
            # the logging model refits on production-served rows only (the exploration slice's clicks
            # still enter the counts its features are made of: they are logged clicks like any other)
            production = shown if explore is None else shown & ~explore
            self.logged.append((day, features[production], labels[production]))
        self.last_day, self.days = day, self.days + 1
        return shown, propensity

    def info(self) -> dict:
        info = {"policy": self.cfg.policy, "days": self.days}
        if self.cfg.policy == "logging":
            info.update(
                cold_start_days=self.cold_days,
                refits=len(self.refits),
                last_model=self.refits[-1] if self.refits else None,
                temperature=self.cfg.temperature,
            )
            if self.refits:
                log.info(
                    "logging policy: %d refits, %d cold-start day(s); last model %s",
                    len(self.refits),
                    self.cold_days,
                    self.refits[-1],
                )
        return info


def _refit(current: LoggingModel | None, logged: list, day: int, cfg: ExposurePolicyConfig) -> LoggingModel | None:
    """A model fitted on the exposed rows of [day - window, day), or None when they are too few."""
    window = [(f, c) for d, f, c in logged if day - cfg.window_days <= d < day]
    if not window:
        return None
    features = np.concatenate([f for f, _ in window])
    clicks = np.concatenate([c for _, c in window])
    if len(clicks) < cfg.min_training_rows or len(np.unique(clicks)) < 2:
        return None
    return LoggingModel.fit(features, clicks, day)


def category_matrix(item_categories: list[list[str]]) -> np.ndarray:
    """(items x categories) with each item's categories weighted equally (rows sum to 1, or 0 without one)."""
    names = sorted({c for cats in item_categories for c in cats})
    index = {c: k for k, c in enumerate(names)}
    matrix = np.zeros((len(item_categories), max(len(names), 1)))
    for row, cats in enumerate(item_categories):
        if cats:
            for c in cats:
                matrix[row, index[c]] = 1.0 / len(cats)
    return matrix


def day_ordinals(timestamps) -> np.ndarray:
    """UTC days since 1970-01-01 of tz-aware timestamps (a pandas Series or DatetimeIndex)."""
    import pandas as pd

    values = pd.Series(pd.to_datetime(timestamps, utc=True))
    return ((values - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(days=1)).to_numpy(np.int64)


__all__ = [
    "Candidates",
    "DailyExposure",
    "Exposure",
    "LoggedCounts",
    "LoggingModel",
    "category_matrix",
    "day_ordinals",
    "draw_top_n",
    "expose",
    "exposed_counts",
    "inclusion_probability",
    "popularity_log_weights",
]
