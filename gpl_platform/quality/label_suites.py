"""The pseudo-label suites of the quality gates: row-level validity (the pooled labels and the confidence
present and in [0, 1]) and one day's distribution (mean, spread, high-confidence-positive share,
confidence quantiles, KL of the confidence histogram against the previous day). Built like the
per-table suites of :mod:`gpl_platform.quality.suites`: GX rules over a copy of the frame with the
derived columns added, a :class:`~gpl_platform.quality.results.QualityResult` out.

The label checks are the gate before training: :func:`~gpl_platform.quality.gate.failing_label_days` re-runs them
for any set of days against the warehouse, so a consumer in a later run can refuse failing days too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from gpl_platform.quality.gx_validation import (
    Rule,
    empty_result,
    merge_chunk_outcomes,
    suite_result,
    validate_rules,
)
from gpl_platform.quality.results import QualityResult
from gpl_platform.thresholds import PseudoLabelThresholds


def confidence_histogram(values: Iterable[float], bins: int = 10) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal-width bins on [0, 1] (NaN and out-of-range dropped)."""
    arr = np.asarray(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return np.histogram(arr, bins=bins, range=(0.0, 1.0))[0].astype(float)


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray, smoothing: float = 0.5) -> float:
    """KL(p || q) of two histograms, both smoothed with a pseudo-count per bin (never infinite)."""
    p = np.asarray(p_counts, float) + smoothing
    q = np.asarray(q_counts, float) + smoothing
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


#: the pooled pseudo-labels, each with the suffix of its rule names: training reads one of them
#: (training.pseudo_label_pooling, mean by default; the ablations fix either), so the gate judges both
POOLED_LABELS = {"pseudo_label": "", "pseudo_label_mean_pool": "_mean_pool"}


def label_columns(frame: pd.DataFrame) -> list[str]:
    """The pooled label columns ``frame`` holds (both in the warehouse; hand-made frames may hold the max pool
    only)."""
    return [col for col in POOLED_LABELS if col in frame.columns]


def label_value_rules(columns: Iterable[str]) -> list[Rule]:
    return [
        rule
        for col in columns
        for rule in (
            Rule(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", {"column": col}, "no nulls/NaN"),
            Rule(
                f"{col}_in_0_1",
                "ExpectColumnValuesToBeBetween",
                {"column": col, "min_value": 0.0, "max_value": 1.0},
                "every value in [0, 1]",
            ),
        )
    ]


def check_pseudo_label_values(labels: pd.DataFrame, cfg: PseudoLabelThresholds | None = None) -> QualityResult:
    """Row-level validity: the pooled labels (:data:`POOLED_LABELS`) and confidence present and in [0, 1]."""
    return check_pseudo_label_value_chunks([labels], cfg)


def check_pseudo_label_value_chunks(
    chunks: Iterable[pd.DataFrame], cfg: PseudoLabelThresholds | None = None
) -> QualityResult:
    """The row-level validity rules over one day given in chunks (one in memory at a time): every rule is a
    row rule, so the chunks' outcomes add up to the day's."""
    cfg = cfg or PseudoLabelThresholds()
    suite = "pseudo_label_values"
    per_chunk, rows = [], 0
    for labels in chunks:
        if labels.empty:
            continue
        columns = [*label_columns(labels), "confidence"]
        per_chunk.append(validate_rules(suite, labels[columns].astype(float), label_value_rules(columns)))
        rows += len(labels)
    if not rows:
        return empty_result(suite, cfg.allow_empty)
    return suite_result(suite, merge_chunk_outcomes(per_chunk), {"rows": rows})


def _label_distribution_rules(column: str, suffix: str, cfg: PseudoLabelThresholds) -> list[Rule]:
    """Mean, spread and high-confidence-positive share of one pooled label (the frame holds
    ``high_confidence_positive<suffix>``)."""
    return [
        Rule(
            f"{column}_mean",
            "ExpectColumnMeanToBeBetween",
            {"column": column, "min_value": cfg.pseudo_label_mean_min, "max_value": cfg.pseudo_label_mean_max},
            f"in [{cfg.pseudo_label_mean_min}, {cfg.pseudo_label_mean_max}]",
        ),
        Rule(
            f"{column}_std",
            "ExpectColumnStdevToBeBetween",
            {"column": column, "min_value": cfg.pseudo_label_std_min},
            f">= {cfg.pseudo_label_std_min} (not collapsed)",
        ),
        Rule(
            f"high_confidence_positive{suffix}_share",
            "ExpectColumnMeanToBeBetween",
            {
                "column": f"high_confidence_positive{suffix}",
                "min_value": 0.0,
                "max_value": cfg.high_confidence_positive_share_max,
            },
            f"<= {cfg.high_confidence_positive_share_max} ({column} >= {cfg.high_label}, "
            f"confidence >= {cfg.high_confidence})",
        ),
    ]


def check_pseudo_label_distribution(
    labels: pd.DataFrame,
    previous: pd.DataFrame | None = None,
    cfg: PseudoLabelThresholds | None = None,
    kl_skip_reason: str | None = None,
) -> QualityResult:
    """Distribution of one day: mean/spread (collapse, saturation) and share of high-confidence positives of
    each pooled label present, confidence mean and quantiles, KL of the confidence histogram vs ``previous``
    (skipped with ``kl_skip_reason`` when the caller knows the previous day is no baseline)."""
    cfg = cfg or PseudoLabelThresholds()
    suite = "pseudo_label_distribution"
    if labels.empty:
        return empty_result(suite, cfg.allow_empty)
    pooled = label_columns(labels)
    frame = labels[[*pooled, "confidence"]].astype(float).copy()
    rules = []
    for col in pooled:
        suffix = POOLED_LABELS[col]
        frame[f"high_confidence_positive{suffix}"] = (
            (frame[col] >= cfg.high_label) & (frame["confidence"] >= cfg.high_confidence)
        ).astype(float)
        rules += _label_distribution_rules(col, suffix, cfg)
    rules += [
        Rule(
            "confidence_mean",
            "ExpectColumnMeanToBeBetween",
            {"column": "confidence", "min_value": cfg.confidence_mean_min, "max_value": cfg.confidence_mean_max},
            f"in [{cfg.confidence_mean_min}, {cfg.confidence_mean_max}]",
        ),
        Rule(
            "confidence_quantiles",
            "ExpectColumnQuantileValuesToBeBetween",
            {
                "column": "confidence",
                "quantile_ranges": {
                    "quantiles": list(cfg.confidence_quantiles),
                    "value_ranges": [list(r) for r in cfg.confidence_quantile_ranges],
                },
            },
            "q"
            + "/".join(f"{q:g}" for q in cfg.confidence_quantiles)
            + " in "
            + ", ".join(f"[{a:g}, {b:g}]" for a, b in cfg.confidence_quantile_ranges),
        ),
    ]
    kl_note = None
    prev_conf = previous["confidence"].astype(float) if previous is not None and len(previous) else None
    if kl_skip_reason:
        kl_note, prev_conf = kl_skip_reason, None
    elif prev_conf is None:
        kl_note = "no previous partition"
    elif len(prev_conf) < cfg.kl_min_rows or len(frame) < cfg.kl_min_rows:
        kl_note = f"fewer than {cfg.kl_min_rows} rows on one of the days"
    else:
        prev_hist = confidence_histogram(prev_conf, cfg.kl_bins) + cfg.kl_smoothing
        rules.append(
            Rule(
                "confidence_kl_vs_previous",
                "ExpectColumnKLDivergenceToBeLessThan",
                {
                    "column": "confidence",
                    "threshold": cfg.kl_max,
                    "partition_object": {
                        "bins": np.linspace(0, 1, cfg.kl_bins + 1).tolist(),
                        "weights": (prev_hist / prev_hist.sum()).tolist(),
                    },
                },
                f"< {cfg.kl_max}",
            )
        )
    outcomes = validate_rules(suite, frame, rules)
    conf = frame["confidence"]
    meta: dict[str, Any] = {"rows": len(frame)}
    for col in pooled:
        meta.update({f"{col}_mean": float(frame[col].mean()), f"{col}_std": float(frame[col].std(ddof=0))})
    meta.update(
        {
            "confidence_mean": float(conf.mean()),
            **{f"confidence_q{int(q * 100):02d}": float(conf.quantile(q)) for q in cfg.confidence_quantiles},
        }
    )
    for col in pooled:
        share = f"high_confidence_positive{POOLED_LABELS[col]}"
        meta[f"{share}_share"] = float(frame[share].mean())
    if prev_conf is not None and len(prev_conf):
        meta["confidence_kl_vs_previous"] = kl_divergence(
            confidence_histogram(conf, cfg.kl_bins), confidence_histogram(prev_conf, cfg.kl_bins), cfg.kl_smoothing
        )
    gx_kl = next((o.observed for o in outcomes if o.name == "confidence_kl_vs_previous"), None)
    if isinstance(gx_kl, (int, float)):
        meta["confidence_kl_vs_previous"] = gx_kl  # the value the rule judged
    if kl_note:
        meta["kl_skipped"] = kl_note
    return suite_result(suite, outcomes, meta)
