"""Thresholds of every quality gate (``settings.quality``; env ``GPL_QUALITY__...``), typed and documented."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class PseudoLabelThresholds(BaseModel):
    """Bounds for one day of pseudo-labels. The defaults accept healthy GPL output on the
    simulator and MovieLens-100K and reject a collapsed (constant) or saturated distribution."""

    allow_empty: bool = Field(True, description="an empty partition passes (e.g. no calibration yet for the day)")
    pseudo_label_mean_min: float = Field(0.01, ge=0, le=1)
    pseudo_label_mean_max: float = Field(0.9, ge=0, le=1)
    pseudo_label_std_min: float = Field(0.005, ge=0, description="below: a collapsed (constant) label distribution")
    confidence_mean_min: float = Field(0.1, ge=0, le=1)
    confidence_mean_max: float = Field(0.95, ge=0, le=1)
    confidence_quantiles: list[float] = Field([0.05, 0.5, 0.95])
    confidence_quantile_ranges: list[tuple[float, float]] = Field(
        [(0.0, 0.9), (0.05, 0.98), (0.1, 1.0)], description="allowed [min, max] of each confidence quantile"
    )
    high_label: float = Field(0.5, ge=0, le=1, description="pseudo_label >= this counts as a positive")
    high_confidence: float = Field(0.8, ge=0, le=1, description="confidence >= this counts as high confidence")
    high_confidence_positive_share_max: float = Field(
        0.5, ge=0, le=1, description="max share of rows that are high-confidence positives (saturation)"
    )
    kl_bins: int = Field(10, gt=1, description="equal-width bins of the confidence histogram on [0, 1]")
    kl_smoothing: float = Field(0.5, ge=0, description="pseudo-count added to every bin of the previous histogram")
    kl_max: float = Field(
        1.5,
        gt=0,
        description="max KL(today || previous day) of the smoothed confidence histogram; the warm-up "
        "days of the 5-day test world reach 1.28 (first labelled day: mostly cold-start users)",
    )
    kl_min_rows: int = Field(50, ge=1, description="fewer rows on either day: the KL check is skipped")


class AnchorThresholds(BaseModel):
    fallback_rate_max: float = Field(
        0.5,
        ge=0,
        le=1,
        description="max share of fallback anchors among users WITH a history (cold-start "
        "users always get the generic anchor and are reported apart)",
    )
    verbatim_copy_rate_max: float = Field(
        0.5,
        ge=0,
        le=1,
        description="max share of generated anchors that repeat a title of the user's history "
        "(not applied to the `history` backend, whose anchors are titles by design)",
    )
    min_anchors_per_user: int = Field(1, ge=1)


class EmbeddingThresholds(BaseModel):
    dim: int | None = Field(None, description="expected dimension; None: all rows must share one dimension")
    norm_tolerance: float = Field(1e-3, gt=0, description="|norm - 1| allowed (vectors are L2-normalized)")


class EventThresholds(BaseModel):
    exposure_rate_min: float = Field(0.02, ge=0, le=1)
    exposure_rate_max: float = Field(0.95, ge=0, le=1)
    positive_rate_min: float = Field(0.005, ge=0, le=1, description="clicks / exposed candidates")
    positive_rate_max: float = Field(0.8, ge=0, le=1)
    positive_rate_min_exposed: int = Field(
        30,
        ge=0,
        description="the positive-rate bounds apply to days with at least this many exposed candidates "
        "(a day that shows 7 items can click 6 of them without anything being wrong)",
    )
    allow_empty: bool = Field(True, description="a day without events passes (written as an empty partition)")
    # The exploration slice shows what a policy chose at random, not what the production policy would:
    # its rates are judged apart, against bounds of their own (docs/DATA_CONTRACT.md).
    exploration_exposure_rate_min: float = Field(0.0, ge=0, le=1)
    exploration_exposure_rate_max: float = Field(1.0, ge=0, le=1)
    exploration_positive_rate_min: float = Field(0.0, ge=0, le=1)
    exploration_positive_rate_max: float = Field(1.0, ge=0, le=1)
    exploration_policies: list[str] = Field(
        default_factory=lambda: ["uniform_random"],
        description="the policies whose rows are judged by the exploration bounds (quality_config sets it from "
        "evaluation.exploration_policies)",
    )


class QualityConfig(BaseModel):
    """Thresholds of every quality gate (``settings.quality``; env ``GPL_QUALITY__...``)."""

    pseudo_labels: PseudoLabelThresholds = PseudoLabelThresholds()
    anchors: AnchorThresholds = AnchorThresholds()
    embeddings: EmbeddingThresholds = EmbeddingThresholds()
    events: EventThresholds = EventThresholds()


def quality_config(settings: Any) -> QualityConfig:
    """``settings.quality`` if Settings has it, else the defaults."""
    cfg = getattr(settings, "quality", None)
    if cfg is None:
        out = QualityConfig()
    else:
        out = (
            cfg
            if isinstance(cfg, QualityConfig)
            else QualityConfig.model_validate(cfg.model_dump() if hasattr(cfg, "model_dump") else cfg)
        )
    evaluation = getattr(settings, "evaluation", None)
    if evaluation is not None:
        events = out.events.model_copy(update={"exploration_policies": list(evaluation.exploration_policies)})
        out = out.model_copy(update={"events": events})
    return out
