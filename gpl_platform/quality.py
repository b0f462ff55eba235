"""Quality gates: Great Expectations 1.x suites over DataFrames (no Dagster here).

Each ``check_*`` function takes the rows of one partition (one UTC day, or a whole table for
unpartitioned data) and a typed thresholds model, runs a GX suite on an ephemeral context with a
whole-dataframe pandas batch (``batch.validate(suite)``; see STACK_NOTES "Great Expectations 1.24")
and returns a :class:`QualityResult`: ``passed``, one :class:`ExpectationOutcome` per expectation
and a compact, JSON-safe ``metadata`` dict for the orchestrator to show.

Derived per-row columns (vector norms, click-label consistency, "high-confidence positive") are
added to a copy of the frame before validation, so every rule is an ordinary GX expectation.
``great_expectations`` is imported lazily (about 3.5 s) on the first validation.

The label checks are the gate before training: :func:`failing_label_days` re-runs them for any
set of days against the warehouse, so a consumer in a later run can refuse failing days too.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from gpl_platform.warehouse import Warehouse

log = logging.getLogger(__name__)


# ---- configuration ---------------------------------------------------------------------------
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
        [(0.0, 0.9), (0.05, 0.98), (0.1, 1.0)], description="allowed [min, max] of each confidence quantile")
    high_label: float = Field(0.5, ge=0, le=1, description="pseudo_label >= this counts as a positive")
    high_confidence: float = Field(0.8, ge=0, le=1, description="confidence >= this counts as high confidence")
    high_confidence_positive_share_max: float = Field(
        0.5, ge=0, le=1, description="max share of rows that are high-confidence positives (saturation)")
    kl_bins: int = Field(10, gt=1, description="equal-width bins of the confidence histogram on [0, 1]")
    kl_smoothing: float = Field(0.5, ge=0, description="pseudo-count added to every bin of the previous histogram")
    kl_max: float = Field(
        1.5, gt=0, description="max KL(today || previous day) of the smoothed confidence histogram; the warm-up "
                               "days of the 5-day test world reach 1.28 (first labelled day: mostly cold-start users)")
    kl_min_rows: int = Field(50, ge=1, description="fewer rows on either day: the KL check is skipped")


class AnchorThresholds(BaseModel):
    fallback_rate_max: float = Field(
        0.5, ge=0, le=1, description="max share of fallback anchors among users WITH a history (cold-start "
                                     "users always get the generic anchor and are reported apart)")
    verbatim_copy_rate_max: float = Field(
        0.5, ge=0, le=1, description="max share of generated anchors that repeat a title of the user's history "
                                     "(not applied to the `history` backend, whose anchors are titles by design)")
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
        30, ge=0, description="the positive-rate bounds apply to days with at least this many exposed candidates "
        "(a day that shows 7 items can click 6 of them without anything being wrong)")
    allow_empty: bool = Field(True, description="a day without events passes (written as an empty partition)")


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
        return QualityConfig()
    return cfg if isinstance(cfg, QualityConfig) else QualityConfig.model_validate(
        cfg.model_dump() if hasattr(cfg, "model_dump") else cfg)


# ---- results ---------------------------------------------------------------------------------
@dataclass
class ExpectationOutcome:
    name: str  # our short rule name, e.g. "confidence_mean"
    expectation: str  # GX expectation type, or "custom"
    column: str | None
    passed: bool
    observed: Any = None
    expected: str = ""

    def describe(self) -> str:
        return f"{self.name}: observed {_fmt(self.observed)}, expected {self.expected}"


@dataclass
class QualityResult:
    suite: str
    passed: bool
    expectations: list[ExpectationOutcome] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why the suite did not apply (passes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.passed]

    def summary(self) -> str:
        if self.skipped:
            return f"{self.suite}: skipped ({self.skipped})"
        if self.passed:
            return f"{self.suite}: {len(self.expectations)} expectations passed"
        return f"{self.suite}: " + "; ".join(e.describe() for e in self.failures)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"rule": e.name, "passed": e.passed, "observed": _fmt(e.observed),
                              "expected": e.expected} for e in self.expectations],
                            columns=["rule", "passed", "observed", "expected"])


class QualityGateError(RuntimeError):
    """Raised by :func:`require_label_days` when days fail the pseudo-label gate."""


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, dict) and "values" in value:
        return "[" + ", ".join(_fmt(v) for v in value["values"]) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


# ---- Great Expectations plumbing -------------------------------------------------------------
_GX_LOCK = threading.Lock()
_GX_STATE: dict[str, Any] = {}


def _gx():
    """(gx module, gxe module, ephemeral context); created once per process."""
    with _GX_LOCK:
        if not _GX_STATE:
            for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
                logging.getLogger(name).setLevel(logging.WARNING)
            import great_expectations as gx
            import great_expectations.expectations as gxe

            context = gx.get_context(mode="ephemeral")
            try:  # no tqdm bars in pipeline logs
                from great_expectations.data_context.types.base import ProgressBarsConfig

                context.variables.progress_bars = ProgressBarsConfig(globally=False)
            except Exception:  # pragma: no cover - older/newer layouts
                log.debug("could not silence GX progress bars", exc_info=True)
            _GX_STATE.update(gx=gx, gxe=gxe, context=context,
                             datasource=context.data_sources.add_pandas("gpl_quality"), batch_defs={})
        return _GX_STATE


def _batch_definition(suite: str):
    state = _gx()
    with _GX_LOCK:
        if suite not in state["batch_defs"]:
            asset = state["datasource"].add_dataframe_asset(suite)
            state["batch_defs"][suite] = asset.add_batch_definition_whole_dataframe(f"{suite}_whole")
        return state["batch_defs"][suite]


@dataclass
class _Rule:
    name: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: dict
    expected: str


def _validate(suite: str, frame: pd.DataFrame, rules: Sequence[_Rule]) -> list[ExpectationOutcome]:
    if not rules:
        return []
    state = _gx()
    gx, gxe = state["gx"], state["gxe"]
    expectations = [getattr(gxe, r.expectation)(**r.kwargs, meta={"rule": r.name}) for r in rules]
    gx_suite = gx.ExpectationSuite(name=suite, expectations=expectations)
    batch = _batch_definition(suite).get_batch(batch_parameters={"dataframe": frame})
    report = batch.validate(gx_suite)
    by_rule = {}
    for res in report.results:
        rule = (res.expectation_config.meta or {}).get("rule")
        observed = res.result.get("observed_value") if res.result else None
        if observed is None and res.result and "unexpected_count" in res.result:
            observed = {"unexpected_count": res.result["unexpected_count"],
                        "unexpected_percent": res.result.get("unexpected_percent")}
        if res.exception_info and res.exception_info.get("raised_exception"):
            observed = f"error: {res.exception_info.get('exception_message')}"
        by_rule[rule] = (bool(res.success), observed)
    out = []
    for r in rules:
        passed, observed = by_rule.get(r.name, (False, "not evaluated"))
        out.append(ExpectationOutcome(r.name, r.expectation, r.kwargs.get("column"), passed, _jsonable(observed),
                                      r.expected))
    return out


def _result(suite: str, outcomes: list[ExpectationOutcome], metadata: dict) -> QualityResult:
    passed = all(o.passed for o in outcomes)
    meta = {"passed": passed, **metadata, "failed_rules": [o.name for o in outcomes if not o.passed],
            "failures": [o.describe() for o in outcomes if not o.passed]}
    return QualityResult(suite, passed, outcomes, _jsonable(meta))


def _custom(name: str, passed: bool, observed: Any, expected: str, column: str | None = None) -> ExpectationOutcome:
    return ExpectationOutcome(name, "custom", column, bool(passed), _jsonable(observed), expected)


# ---- pseudo-labels ---------------------------------------------------------------------------
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


def check_pseudo_label_values(labels: pd.DataFrame, cfg: PseudoLabelThresholds | None = None) -> QualityResult:
    """Row-level validity: pseudo_label and confidence present and in [0, 1]."""
    cfg = cfg or PseudoLabelThresholds()
    suite = "pseudo_label_values"
    if labels.empty:
        return _empty(suite, cfg.allow_empty)
    rules = []
    for col in ("pseudo_label", "confidence"):
        rules += [_Rule(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", {"column": col}, "no nulls/NaN"),
                  _Rule(f"{col}_in_0_1", "ExpectColumnValuesToBeBetween",
                        {"column": col, "min_value": 0.0, "max_value": 1.0}, "every value in [0, 1]")]
    frame = labels[["pseudo_label", "confidence"]].astype(float)
    outcomes = _validate(suite, frame, rules)
    return _result(suite, outcomes, {"rows": len(labels)})


def check_pseudo_label_distribution(labels: pd.DataFrame, previous: pd.DataFrame | None = None,
                                    cfg: PseudoLabelThresholds | None = None,
                                    kl_skip_reason: str | None = None) -> QualityResult:
    """Distribution of one day: label mean/spread (collapse, saturation), confidence mean and
    quantiles, share of high-confidence positives, KL of the confidence histogram vs ``previous``
    (skipped with ``kl_skip_reason`` when the caller knows the previous day is no baseline)."""
    cfg = cfg or PseudoLabelThresholds()
    suite = "pseudo_label_distribution"
    if labels.empty:
        return _empty(suite, cfg.allow_empty)
    frame = labels[["pseudo_label", "confidence"]].astype(float).copy()
    frame["high_confidence_positive"] = ((frame["pseudo_label"] >= cfg.high_label)
                                         & (frame["confidence"] >= cfg.high_confidence)).astype(float)
    rules = [
        _Rule("pseudo_label_mean", "ExpectColumnMeanToBeBetween",
              {"column": "pseudo_label", "min_value": cfg.pseudo_label_mean_min, "max_value": cfg.pseudo_label_mean_max},
              f"in [{cfg.pseudo_label_mean_min}, {cfg.pseudo_label_mean_max}]"),
        _Rule("pseudo_label_std", "ExpectColumnStdevToBeBetween",
              {"column": "pseudo_label", "min_value": cfg.pseudo_label_std_min},
              f">= {cfg.pseudo_label_std_min} (not collapsed)"),
        _Rule("confidence_mean", "ExpectColumnMeanToBeBetween",
              {"column": "confidence", "min_value": cfg.confidence_mean_min, "max_value": cfg.confidence_mean_max},
              f"in [{cfg.confidence_mean_min}, {cfg.confidence_mean_max}]"),
        _Rule("confidence_quantiles", "ExpectColumnQuantileValuesToBeBetween",
              {"column": "confidence", "quantile_ranges": {"quantiles": list(cfg.confidence_quantiles),
                                                           "value_ranges": [list(r) for r in cfg.confidence_quantile_ranges]}},
              "q" + "/".join(f"{q:g}" for q in cfg.confidence_quantiles) + " in "
              + ", ".join(f"[{a:g}, {b:g}]" for a, b in cfg.confidence_quantile_ranges)),
        _Rule("high_confidence_positive_share", "ExpectColumnMeanToBeBetween",
              {"column": "high_confidence_positive", "min_value": 0.0,
               "max_value": cfg.high_confidence_positive_share_max},
              f"<= {cfg.high_confidence_positive_share_max} (label >= {cfg.high_label}, "
              f"confidence >= {cfg.high_confidence})"),
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
        rules.append(_Rule("confidence_kl_vs_previous", "ExpectColumnKLDivergenceToBeLessThan",
                           {"column": "confidence", "threshold": cfg.kl_max,
                            "partition_object": {"bins": np.linspace(0, 1, cfg.kl_bins + 1).tolist(),
                                                 "weights": (prev_hist / prev_hist.sum()).tolist()}},
                           f"< {cfg.kl_max}"))
    outcomes = _validate(suite, frame, rules)
    conf = frame["confidence"]
    meta: dict[str, Any] = {
        "rows": len(frame), "pseudo_label_mean": float(frame["pseudo_label"].mean()),
        "pseudo_label_std": float(frame["pseudo_label"].std(ddof=0)),
        "confidence_mean": float(conf.mean()),
        **{f"confidence_q{int(q * 100):02d}": float(conf.quantile(q)) for q in cfg.confidence_quantiles},
        "high_confidence_positive_share": float(frame["high_confidence_positive"].mean()),
    }
    if prev_conf is not None and len(prev_conf):
        meta["confidence_kl_vs_previous"] = kl_divergence(confidence_histogram(conf, cfg.kl_bins),
                                                          confidence_histogram(prev_conf, cfg.kl_bins),
                                                          cfg.kl_smoothing)
    gx_kl = next((o.observed for o in outcomes if o.name == "confidence_kl_vs_previous"), None)
    if isinstance(gx_kl, (int, float)):
        meta["confidence_kl_vs_previous"] = gx_kl  # the value the rule judged
    if kl_note:
        meta["kl_skipped"] = kl_note
    return _result(suite, outcomes, meta)


def _empty(suite: str, allowed: bool) -> QualityResult:
    outcome = _custom("rows", allowed, 0, "> 0 rows" if not allowed else "any")
    res = _result(suite, [outcome], {"rows": 0})
    if allowed:
        res.skipped = "empty partition"
        res.metadata["skipped"] = "empty partition"
    return res


# ---- anchors ---------------------------------------------------------------------------------
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)
_YEAR = re.compile(r"\(\d{4}\)")


def normalize_title(text: Any) -> str:
    """Case, punctuation and a trailing '(1995)' year ignored: 'Toy Story (1995)' == 'toy story'."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return _NON_WORD.sub(" ", _YEAR.sub(" ", str(text).lower())).strip()


def check_anchors(anchors: pd.DataFrame, histories: pd.DataFrame, items: pd.DataFrame | None = None,
                  cfg: AnchorThresholds | None = None) -> QualityResult:
    """One day of ``user_anchors`` against that day's ``user_histories``: every user with a
    history row has at least one anchor, the fallback rate (users with a history) is bounded, and
    generated anchors are mostly not verbatim history titles. ``items`` (item_id, text) is needed
    for the verbatim rule."""
    cfg = cfg or AnchorThresholds()
    suite = "user_anchors"
    users = pd.DataFrame({"user_id": histories["user_id"].astype(str).unique()})
    per_user = anchors.groupby(anchors["user_id"].astype(str)).size().rename("n_anchors")
    users = users.merge(per_user, left_on="user_id", right_index=True, how="left").fillna({"n_anchors": 0})
    rules = [_Rule("every_user_has_anchors", "ExpectColumnValuesToBeBetween",
                   {"column": "n_anchors", "min_value": cfg.min_anchors_per_user},
                   f">= {cfg.min_anchors_per_user} anchor per user with a request")]
    outcomes = _validate(f"{suite}_users", users, rules) if len(users) else []

    reasons = anchors["fallback_reason"].astype(object)
    cold = reasons.eq("empty_history")
    warm = anchors[~cold.to_numpy()]
    fallback_rate = float(warm["is_fallback"].astype(bool).mean()) if len(warm) else 0.0
    if len(warm):
        frame = pd.DataFrame({"is_fallback": warm["is_fallback"].astype(bool).astype(float).to_numpy()})
        outcomes += _validate(f"{suite}_fallback", frame, [
            _Rule("fallback_rate", "ExpectColumnMeanToBeBetween",
                  {"column": "is_fallback", "min_value": 0.0, "max_value": cfg.fallback_rate_max},
                  f"<= {cfg.fallback_rate_max} among users with a history")])

    backends = sorted(set(anchors["backend"].dropna().astype(str))) if "backend" in anchors else []
    generated = anchors[~anchors["is_fallback"].astype(bool).to_numpy()]
    if "backend" in generated:
        generated = generated[generated["backend"].astype(str) != "history"]
    copy_rate = None
    if len(generated) and items is not None:
        copied = verbatim_copies(generated, histories, items)
        copy_rate = float(copied.mean())
        outcomes += _validate(f"{suite}_verbatim", pd.DataFrame({"verbatim_copy": copied.astype(float)}), [
            _Rule("verbatim_copy_rate", "ExpectColumnMeanToBeBetween",
                  {"column": "verbatim_copy", "min_value": 0.0, "max_value": cfg.verbatim_copy_rate_max},
                  f"<= {cfg.verbatim_copy_rate_max} of generated anchors repeat a history title")])
    meta = {
        "anchors": len(anchors), "users_with_request": len(users),
        "users_without_anchor": int((users["n_anchors"] < cfg.min_anchors_per_user).sum()) if len(users) else 0,
        "fallback_rate_with_history": fallback_rate,
        "cold_start_anchor_share": float(cold.mean()) if len(anchors) else 0.0,
        "verbatim_copy_rate": copy_rate if copy_rate is not None else "n/a (no generated anchors)",
        "backends": ", ".join(backends) or "none",
    }
    if not outcomes:
        outcomes = [_custom("rows", True, 0, "any")]
    return _result(suite, outcomes, meta)


def verbatim_copies(anchors: pd.DataFrame, histories: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """Boolean per anchor row: its normalized text equals a normalized title in the same user's
    history of the same day."""
    titles = dict(zip(items["item_id"].astype(str), items["text"].map(normalize_title)))
    keyed = {}
    day_col = "day" in histories.columns and "day" in anchors.columns
    for row in histories.itertuples(index=False):
        key = (str(row.day), str(row.user_id)) if day_col else str(row.user_id)
        ids = row.history_item_ids if row.history_item_ids is not None else []
        keyed[key] = {titles.get(str(i), "") for i in ids} - {""}
    out = np.zeros(len(anchors), dtype=bool)
    days = anchors["day"].astype(str).to_numpy() if day_col else None
    for pos, (user, text) in enumerate(zip(anchors["user_id"].astype(str), anchors["anchor_text"])):
        key = (days[pos], user) if day_col else user
        out[pos] = normalize_title(text) in keyed.get(key, set())
    return out


# ---- embeddings ------------------------------------------------------------------------------
def check_embeddings(frame: pd.DataFrame, cfg: EmbeddingThresholds | None = None, column: str = "vector",
                     name: str = "embeddings") -> QualityResult:
    """Every vector: the expected (or one common) dimension, L2 norm ~ 1, no NaN/inf."""
    cfg = cfg or EmbeddingThresholds()
    suite = f"{name}_vectors"
    if frame.empty:
        return _empty(suite, True)
    vectors = frame[column].tolist()
    dims = np.fromiter((len(v) if v is not None else 0 for v in vectors), dtype=np.int64, count=len(vectors))
    common = int(pd.Series(dims).mode().iloc[0])
    expected_dim = cfg.dim if cfg.dim is not None else common
    norms = np.full(len(vectors), np.nan)
    finite = np.zeros(len(vectors), dtype=bool)
    same = dims == common
    if same.any() and common > 0:
        mat = np.stack([np.asarray(v, dtype=np.float64) for v, ok in zip(vectors, same) if ok])
        finite[same] = np.isfinite(mat).all(axis=1)
        norms[same] = np.linalg.norm(mat, axis=1)
    for i in np.flatnonzero(~same):
        arr = np.asarray(vectors[i] if vectors[i] is not None else [], dtype=np.float64)
        finite[i] = bool(np.isfinite(arr).all()) and arr.size > 0
        norms[i] = float(np.linalg.norm(arr)) if arr.size else 0.0
    checked = pd.DataFrame({"dim": dims, "norm": norms, "finite": finite})
    tol = cfg.norm_tolerance
    rules = [
        _Rule("dimension", "ExpectColumnValuesToBeInSet", {"column": "dim", "value_set": [expected_dim]},
              f"== {expected_dim}"),
        _Rule("no_nan", "ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]},
              "no NaN/inf component"),
        _Rule("unit_norm", "ExpectColumnValuesToBeBetween",
              {"column": "norm", "min_value": 1 - tol, "max_value": 1 + tol}, f"L2 norm in [{1 - tol:g}, {1 + tol:g}]"),
    ]
    outcomes = _validate(suite, checked, rules)
    finite_norms = norms[np.isfinite(norms)]
    return _result(suite, outcomes, {
        "rows": len(frame), "dim": expected_dim, "dims_seen": sorted({int(d) for d in dims})[:5],
        "rows_with_nan": int((~finite).sum()),
        "norm_min": float(finite_norms.min()) if finite_norms.size else float("nan"),
        "norm_max": float(finite_norms.max()) if finite_norms.size else float("nan"),
    })


# ---- events ----------------------------------------------------------------------------------
def check_events(events: pd.DataFrame, cfg: EventThresholds | None = None) -> QualityResult:
    """One day of candidate events: the data contract (ids and times present, one row per
    request/item, a click label exactly on exposed rows, labels in {0, 1}) and exposure and
    positive rates within bounds."""
    cfg = cfg or EventThresholds()
    suite = "candidate_events"
    if events.empty:
        return _empty(suite, cfg.allow_empty)
    exposed = events["exposed"].astype("boolean")
    clicked = pd.to_numeric(events["clicked"], errors="coerce")
    frame = events[["request_id", "user_id", "item_id", "event_time"]].copy()
    frame["exposed"] = exposed.astype(float)
    frame["click_label_consistent"] = ((exposed.fillna(False) & clicked.notna())
                                       | (~exposed.fillna(True) & clicked.isna())).astype(bool)
    frame["clicked_exposed"] = clicked.where(exposed.fillna(False).to_numpy(bool)).astype(float)
    rules = [_Rule(f"{c}_not_null", "ExpectColumnValuesToNotBeNull", {"column": c}, "no nulls")
             for c in ("request_id", "user_id", "item_id", "event_time", "exposed")]
    rules += [
        _Rule("unique_request_item", "ExpectCompoundColumnsToBeUnique", {"column_list": ["request_id", "item_id"]},
              "one row per (request_id, item_id)"),
        _Rule("click_label_on_exposed_only", "ExpectColumnValuesToBeInSet",
              {"column": "click_label_consistent", "value_set": [True]},
              "clicked set exactly on exposed rows"),
        _Rule("clicked_binary", "ExpectColumnValuesToBeInSet", {"column": "clicked_exposed", "value_set": [0.0, 1.0]},
              "clicked in {0, 1}"),
        _Rule("exposure_rate", "ExpectColumnMeanToBeBetween",
              {"column": "exposed", "min_value": cfg.exposure_rate_min, "max_value": cfg.exposure_rate_max},
              f"in [{cfg.exposure_rate_min}, {cfg.exposure_rate_max}]"),
    ]
    n_exposed = int(exposed.fillna(False).sum())
    if n_exposed >= cfg.positive_rate_min_exposed:
        rules.append(_Rule("positive_rate", "ExpectColumnMeanToBeBetween",
                           {"column": "clicked_exposed", "min_value": cfg.positive_rate_min,
                            "max_value": cfg.positive_rate_max},
                           f"clicks/exposed in [{cfg.positive_rate_min}, {cfg.positive_rate_max}]"))
    outcomes = _validate(suite, frame, rules)
    return _result(suite, outcomes, {
        "rows": len(events), "requests": int(events["request_id"].nunique()),
        "exposure_rate": float(n_exposed / len(events)),
        "positive_rate": float(frame["clicked_exposed"].mean()) if n_exposed else float("nan"),
    })


# ---- warehouse helpers (per-day evaluation) --------------------------------------------------
def _day_str(d: Any) -> str:
    return pd.Timestamp(d).date().isoformat()


def load_label_days(warehouse: "Warehouse", days: Sequence[date], with_previous: bool = True,
                    table: str = "pseudo_labels") -> pd.DataFrame:
    """pseudo_label/confidence of ``days`` (and of the day before each, for the KL rule)."""
    wanted = {pd.Timestamp(d).date() for d in days}
    if with_previous:
        wanted |= {d - timedelta(days=1) for d in list(wanted)}
    frame = warehouse.query(f"SELECT day, pseudo_label, confidence FROM {table} "
                            "WHERE day IN (SELECT unnest(?::DATE[]))", [sorted(wanted)])
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame


def check_label_days(labels: pd.DataFrame, days: Sequence[date], cfg: PseudoLabelThresholds | None = None,
                     ) -> dict[date, tuple[QualityResult, QualityResult]]:
    """Both pseudo-label suites for each of ``days``; ``labels`` has a `day` column and may hold
    the previous days too (used for the KL rule)."""
    cfg = cfg or PseudoLabelThresholds()
    groups = {d: g for d, g in labels.groupby("day")}
    empty = labels.iloc[0:0]
    out = {}
    for d in sorted({pd.Timestamp(x).date() for x in days}):
        today = groups.get(d, empty)
        previous = groups.get(d - timedelta(days=1))
        skip = None
        if previous is not None and len(previous) and not _baseline_ok(previous, cfg):
            # A broken previous day is no baseline: its own gate fails it; today is judged on its own.
            skip, previous = "previous day fails its own gate (no baseline)", None
        out[d] = (check_pseudo_label_values(today, cfg),
                  check_pseudo_label_distribution(today, previous, cfg, kl_skip_reason=skip))
    return out


def _baseline_ok(previous: pd.DataFrame, cfg: PseudoLabelThresholds) -> bool:
    return check_pseudo_label_values(previous, cfg).passed and check_pseudo_label_distribution(previous, None, cfg).passed


def failing_label_days(warehouse: "Warehouse", days: Sequence[date], cfg: PseudoLabelThresholds | None = None,
                       table: str = "pseudo_labels") -> dict[date, str]:
    """Days of ``days`` whose pseudo-labels (in ``table``) fail a gate, with the reason (empty: all pass)."""
    results = check_label_days(load_label_days(warehouse, days, table=table), days, cfg)
    return {d: "; ".join(r.summary() for r in pair if not r.passed)
            for d, pair in results.items() if not all(r.passed for r in pair)}


def require_label_days(warehouse: "Warehouse", days: Sequence[date], cfg: PseudoLabelThresholds | None = None
                       ) -> None:
    """For consumers of pseudo-labels in later runs (training): raise if any day fails the gate."""
    failing = failing_label_days(warehouse, days, cfg)
    if failing:
        raise QualityGateError("pseudo-labels of these days failed the quality gate and must not be consumed:\n"
                               + "\n".join(f"  {d}: {why}" for d, why in sorted(failing.items())))


EVENT_CHECK_COLUMNS = ("request_id", "user_id", "item_id", "event_time", "exposed", "clicked")


def check_event_days(warehouse: "Warehouse", days: Sequence[date], cfg: EventThresholds | None = None
                     ) -> dict[date, QualityResult]:
    """The events suite for each of ``days`` (an absent or empty day: the suite's empty rule)."""
    days = sorted({pd.Timestamp(d).date() for d in days})
    if not days:
        return {}
    frame = warehouse.query(f"SELECT day, {', '.join(EVENT_CHECK_COLUMNS)} FROM events "
                            "WHERE day IN (SELECT unnest(?::DATE[]))", [days])
    groups = {d: g for d, g in frame.groupby(pd.to_datetime(frame["day"]).dt.date)}
    empty = frame.iloc[0:0]
    return {d: check_events(groups.get(d, empty)[list(EVENT_CHECK_COLUMNS)], cfg) for d in days}


def failing_event_days(warehouse: "Warehouse", days: Sequence[date], cfg: EventThresholds | None = None
                       ) -> dict[date, str]:
    """Days whose events fail the events suite (implausible click or exposure rates, broken labels),
    with the reason: consumers leave them out like days failing the pseudo-label gate."""
    return {d: r.summary() for d, r in check_event_days(warehouse, days, cfg).items() if not r.passed}
