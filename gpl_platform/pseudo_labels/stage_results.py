"""What each labelling stage returns (:class:`~gpl_platform.pseudo_labels.chain.LabellingChain`): frozen
dataclasses with named fields, which the assets turn into Dagster metadata and the tests and benchmarks read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date

import pandas as pd


@dataclass(frozen=True)
class AnchorsResult:
    """Step 1 (``generate_anchors``): what was written and what the generation cost. ``counters`` is every
    counter in the order the stage made them (the generator's ``fallback_*`` and prompt counters, cache hits
    and misses, then the four totals), for the asset's table."""

    user_days: int
    distinct_histories: int
    anchors: int
    serving_models: int
    counters: Mapping[str, int] = field(default_factory=dict)

    @property
    def cache_hits(self) -> int:
        return int(self.counters.get("cache_hits", 0))

    @property
    def cache_misses(self) -> int:
        return int(self.counters.get("cache_misses", 0))

    @property
    def fallbacks(self) -> dict[str, int]:
        return {key: value for key, value in self.counters.items() if key.startswith("fallback_")}


@dataclass(frozen=True, eq=False)  # frames do not compare to a bool
class AnchorSummary:
    """What the anchors of some days look like (``anchor_summary``): rows, fallback share and reasons, and
    the anchors of the first users."""

    rows: int
    fallback_share: float
    fallback_reasons: pd.DataFrame
    examples: pd.DataFrame


@dataclass(frozen=True)
class EmbeddingsResult:
    """Step 2 (``embed_anchors``): anchors embedded, distinct texts encoded, the encoder and its dimension."""

    anchors: int
    distinct_texts: int
    encoder_id: str
    dim: int


@dataclass(frozen=True)
class SimilaritiesResult:
    """Step 3a (``score_day_candidates``): candidates scored, those with an anchor, the mean max-pooled
    similarity, and how the work was cut."""

    candidates: int
    covered: int
    coverage: float
    similarity_max_mean: float
    batches: int
    staged_groups: int
    engine: str


@dataclass(frozen=True)
class DayCalibration:
    """The calibration serving one day in one pooling (``version`` "none": the day has none yet)."""

    day: date
    pooling: str
    version: str
    n_train: int
    train_window: str


@dataclass(frozen=True)
class LabelGaps:
    """Who got no pseudo-labels and why: users without history (by the no-history rule), days without a
    calibration yet, days whose calibration carries no ranking (day -> reason)."""

    no_history_rule: str
    no_history_candidates: int
    no_history_user_days: int
    no_history_labelled: int
    days_without_calibration: tuple[str, ...]
    days_with_degenerate_calibration: Mapping[str, str]


@dataclass(frozen=True, eq=False)  # frames do not compare to a bool
class LabelDistribution:
    """The written labels of the range: their number, means and quantiles (indexed by ``q``; None without
    labels), and a bounded hash ``sample`` of them (``pseudo_label``, ``confidence``; for plots)."""

    rows: int
    pseudo_label_mean: float
    confidence_mean: float
    quantiles: pd.DataFrame | None
    sample: pd.DataFrame


@dataclass(frozen=True, eq=False)
class LabelsResult:
    """Step 4 (``pseudo_label_days``): the unexposed candidates of the range, who got no labels and why, the
    calibration versions used, the distribution of the labels written, and how the work was cut."""

    unexposed_candidates: int
    gaps: LabelGaps
    distribution: LabelDistribution
    calibration_versions: tuple[str, ...]
    batches: int
    staged_groups: int
    engine: str

    @property
    def rows(self) -> int:
        """Labels written."""
        return self.distribution.rows

    @property
    def coverage(self) -> float:
        """Share of the unexposed candidates that got a label."""
        return float(self.rows / self.unexposed_candidates) if self.unexposed_candidates else 0.0


@dataclass(frozen=True, eq=False)
class ChainResult:
    """The four stages run in order over a range (``LabellingChain.run``)."""

    anchors: AnchorsResult
    embeddings: EmbeddingsResult
    similarities: SimilaritiesResult
    labels: LabelsResult
