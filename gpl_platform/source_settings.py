"""The settings of the data sources: the MovieLens-100K protocol, the simulator's world, a contract directory,
and the exposure policies of the two benchmark sources (``settings.movielens``, ``.simulator``, ``.contract``;
env ``GPL_MOVIELENS__...``). Part of :class:`gpl_platform.config.Settings`."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


def _exploration_share(source: str):
    """The exploration slice's setting of a benchmark source (one definition for both). Left out of the
    settings' dump at 0, so that the source signatures of the data ingested before it existed still match."""
    return Field(
        0.0,
        ge=0,
        lt=1,
        exclude_if=lambda share: share == 0,
        description=f"share of each day's {source} requests (chosen at random) served by the uniform-random "
        "exploration policy instead of the exposure policy: as many candidates shown as the policy would show, "
        "drawn uniformly (propensity k/n), logging_policy 'uniform_random'; 0: no exploration slice",
    )


class ExposurePolicyConfig(BaseModel):
    """Which of a request's recalled candidates the simulated logging system shows (docs/EVALUATION.md).

    ``popularity``: Plackett-Luce by ``pop(i)^power``, independent of what the user wants (the first
    protocol). ``logging``: a logging model trained only on exposed clicks of earlier days scores
    every candidate and shows its top-k under Gumbel noise (a feedback loop: exposure follows
    estimated relevance). ``self_selection``: the popularity policy plus ``self_selection_strength``
    on the log-odds of candidates whose true label is 1 (missing not at random, as in the debiasing
    literature). Every candidate's true exposure probability is recorded as ``propensity``."""

    policy: Literal["popularity", "logging", "self_selection"] = Field(
        "popularity", description="popularity | logging | self_selection"
    )
    max_per_request: int | None = Field(
        None, ge=1, description="expose at most this many candidates per request (top-k); none: the share alone"
    )
    temperature: float = Field(
        0.25,
        gt=0,
        description="logging: exposure log-weight = logging-model logit / temperature, plus Gumbel noise "
        "(higher: more exploration)",
    )
    retrain_every_days: int = Field(7, gt=0, description="logging: the logging model is refitted every N days")
    window_days: int = Field(56, gt=0, description="logging: it learns from the exposed clicks of the last N days")
    min_training_rows: int = Field(
        200,
        gt=1,
        description="logging: fewer exposed rows (or one class) in the window: keep the last model, or "
        "expose by popularity while there is none (cold start)",
    )
    self_selection_strength: float = Field(
        2.0, ge=0, description="self_selection: added to the log-weight of candidates whose true label is 1"
    )
    propensity_samples: int = Field(
        200,
        ge=0,
        description="Monte-Carlo draws of the policy per request that estimate each candidate's "
        "exposure probability (0: not estimated, for scale runs)",
    )


class MovieLensExposurePolicyConfig(ExposurePolicyConfig):
    """MovieLens' default is the realistic reference setting: a logging policy (a subclass, so that a
    partial override such as ``exposure.temperature`` keeps this default)."""

    policy: Literal["popularity", "logging", "self_selection"] = Field(
        "logging", description="popularity | logging | self_selection"
    )


class SimulatorExposurePolicyConfig(ExposurePolicyConfig):
    """The simulator's worlds are a few weeks long: its logging model is refitted daily."""

    retrain_every_days: int = Field(1, gt=0, description="logging: the logging model is refitted every N days")


class MovieLensConfig(BaseModel):
    """Semi-synthetic protocol that turns MovieLens ratings into recalled, partly exposed requests."""

    path: Path | None = Field(
        default=None,
        description="Directory with ml-100k.{inter,item,user} or u.{data,item,user}. "
        "Default: ../shared/datasets/ml-100k if present, else data/datasets/ml-100k (fetched).",
    )
    positive_rating: float = Field(4.0, description="explicit labels: rating >= this is a positive (true label 1)")
    labels: Literal["explicit", "implicit"] = Field(
        "explicit",
        description="explicit: a rated item is positive when its rating >= positive_rating; implicit: "
        "any rating is an interaction (positive), the convention of sequential-recommendation benchmarks",
    )
    unrated_per_request: int = Field(
        20, ge=0, description="unrated items a recall-like policy adds to each request as negatives"
    )
    recall_popularity_power: float = Field(
        1.0, ge=0, description="unrated candidates are drawn with weight pop(i)^power"
    )
    recall_cooccurrence_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the unrated candidates drawn by an item co-occurrence recall over "
        "the ratings of earlier days (items that co-occur with the user's earlier ratings); the rest by popularity",
    )
    recall_retrain_every_days: int = Field(7, gt=0, description="the co-occurrence recall is rebuilt every N days")
    exposure_share: float = Field(0.1, gt=0, le=1, description="share of each request's candidates the policy exposes")
    exposure_popularity_power: float = Field(
        1.0, ge=0, description="Plackett-Luce exposure weight pop(i)^alpha (the selection bias)"
    )
    # the realistic reference setting (logging_10 of docs/EVALUATION.md); the first protocol is
    # exposure.policy=popularity, exposure_share=0.3, recall_cooccurrence_share=0
    exposure: MovieLensExposurePolicyConfig = Field(default_factory=lambda: MovieLensExposurePolicyConfig())
    exploration_share: float = _exploration_share("MovieLens")


class SimulatorConfig(BaseModel):
    """Synthetic world with a known preference model (for tests and scale benchmarks)."""

    n_users: int = Field(500, gt=0)
    n_items: int = Field(2000, gt=0)
    n_topics: int = Field(12, gt=1)
    n_days: int = Field(14, gt=0)
    start_date: str = Field("2024-01-01", description="first simulated UTC day (YYYY-MM-DD)")
    requests_per_user_per_day: float = Field(0.5, gt=0)
    candidates_per_request: int = Field(40, gt=1)
    recall: Literal["preference", "logged_clicks"] = Field(
        "preference",
        description="where the half of each request that is not popularity-drawn comes from: "
        "'preference': items of topics drawn from the user's true preference (an ideal recall); 'logged_clicks': "
        "a recall model over the clicks logged on earlier days, item co-occurrence plus the categories the user "
        "clicked (what a real recall learns from; days are then generated one by one, each after the exposure "
        "of the days before)",
    )
    recall_retrain_every_days: int = Field(
        1, gt=0, description="logged_clicks recall: co-occurrence rebuilt every N days"
    )
    exposure_share: float = Field(0.25, gt=0, le=1)
    exposure_popularity_power: float = Field(1.0, ge=0)
    exposure: SimulatorExposurePolicyConfig = Field(default_factory=lambda: SimulatorExposurePolicyConfig())
    exploration_share: float = _exploration_share("simulated")
    preference_strength: float = Field(4.0, ge=0, description="logit weight of user-topic affinity")
    base_click_logit: float = Field(-2.5)


class ContractConfig(BaseModel):
    path: Path | None = Field(None, description="directory of items/users/events parquet or CSV files")
    start_date: date | None = Field(
        None,
        description="first daily partition (UTC); default: the data's first day, read from the names of "
        "events/day=YYYY-MM-DD/ folders or from parquet statistics, never from the rows",
    )
    earliest_event_time: date = Field(
        date(1990, 1, 1),
        description="events before this UTC day are refused by validation (clock errors such as 1970-01-01)",
    )
    max_future_days: int = Field(1, ge=0, description="events later than now + N days are refused by validation")
    missing_days: Literal["keep", "clear"] = Field(
        "keep",
        description="a day that was delivered once and is missing from a later delivery: keep its rows "
        "(warned in the sensor and in candidate_events) or clear it (re-ingested as an empty day)",
    )
