"""Quality gates: Great Expectations 1.x suites over DataFrames (no Dagster here), per table: events,
anchors, embeddings; the pseudo-label suites are in :mod:`gpl_platform.quality.label_suites`.

Each ``check_*`` function takes the rows of one partition (one UTC day, or a whole table for
unpartitioned data) and a typed thresholds model, runs a GX suite on an ephemeral context with a
whole-dataframe pandas batch (``batch.validate(suite)``; see STACK_NOTES "Great Expectations 1.24")
and returns a :class:`QualityResult`: ``passed``, one :class:`ExpectationOutcome` per expectation
and a compact, JSON-safe ``metadata`` dict for the orchestrator to show.

Derived per-row columns (vector norms, click-label consistency, "high-confidence positive") are
added to a copy of the frame before validation, so every rule is an ordinary GX expectation.
``great_expectations`` is imported lazily (about 3.5 s) on the first validation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from gpl_platform.pseudo_labels.anchors.base import FALLBACK_EMPTY_HISTORY, FALLBACK_NO_SID_MODEL
from gpl_platform.quality.gx_validation import (
    Rule,
    custom_outcome,
    empty_result,
    merge_chunk_outcomes,
    suite_result,
    validate_rules,
)
from gpl_platform.quality.results import QualityResult
from gpl_platform.thresholds import AnchorThresholds, EmbeddingThresholds, EventThresholds

# ---- anchors ---------------------------------------------------------------------------------
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)
_YEAR = re.compile(r"\(\d{4}\)")


def normalize_title(text: Any) -> str:
    """Case, punctuation and a trailing '(1995)' year ignored: 'Toy Story (1995)' == 'toy story'."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return _NON_WORD.sub(" ", _YEAR.sub(" ", str(text).lower())).strip()


def check_anchors(
    anchors: pd.DataFrame,
    histories: pd.DataFrame,
    items: pd.DataFrame | None = None,
    cfg: AnchorThresholds | None = None,
    warm_up: bool = False,
) -> QualityResult:
    """One day of ``user_anchors`` against that day's ``user_histories``: every user with a
    history row has at least one anchor, the fallback rate (users with a history) is bounded, and
    generated anchors are mostly not verbatim history titles. ``items`` (item_id, text) is needed
    for the verbatim rule.

    ``warm_up``: the day comes before the generator's first generated anchor. A day-bound generator (``sid``)
    has no model before its first refit and serves history anchors by design (``no_sid_model``): those are set
    apart like cold-start users' and the metadata says why; the other rules judge the day as usual."""
    cfg = cfg or AnchorThresholds()
    suite = "user_anchors"
    users = pd.DataFrame({"user_id": histories["user_id"].astype(str).unique()})
    per_user = anchors.groupby(anchors["user_id"].astype(str)).size().rename("n_anchors")
    users = users.merge(per_user, left_on="user_id", right_index=True, how="left").fillna({"n_anchors": 0})
    rules = [
        Rule(
            "every_user_has_anchors",
            "ExpectColumnValuesToBeBetween",
            {"column": "n_anchors", "min_value": cfg.min_anchors_per_user},
            f">= {cfg.min_anchors_per_user} anchor per user with a request",
        )
    ]
    outcomes = validate_rules(f"{suite}_users", users, rules) if len(users) else []

    reasons = anchors["fallback_reason"].astype(object)
    cold = reasons.eq(FALLBACK_EMPTY_HISTORY)
    warming_up = reasons.eq(FALLBACK_NO_SID_MODEL) & warm_up
    judged = anchors[~(cold | warming_up).to_numpy()]  # users with a history and a model to serve them
    fallback_rate = float(judged["is_fallback"].astype(bool).mean()) if len(judged) else 0.0
    if len(judged):
        frame = pd.DataFrame({"is_fallback": judged["is_fallback"].astype(bool).astype(float).to_numpy()})
        outcomes += validate_rules(
            f"{suite}_fallback",
            frame,
            [
                Rule(
                    "fallback_rate",
                    "ExpectColumnMeanToBeBetween",
                    {"column": "is_fallback", "min_value": 0.0, "max_value": cfg.fallback_rate_max},
                    f"<= {cfg.fallback_rate_max} among users with a history",
                )
            ],
        )

    backends = sorted(set(anchors["backend"].dropna().astype(str))) if "backend" in anchors else []
    generated = anchors[~anchors["is_fallback"].astype(bool).to_numpy()]
    if "backend" in generated:
        generated = generated[generated["backend"].astype(str) != "history"]
    copy_rate = None
    if len(generated) and items is not None:
        copied = verbatim_copies(generated, histories, items)
        copy_rate = float(copied.mean())
        outcomes += validate_rules(
            f"{suite}_verbatim",
            pd.DataFrame({"verbatim_copy": copied.astype(float)}),
            [
                Rule(
                    "verbatim_copy_rate",
                    "ExpectColumnMeanToBeBetween",
                    {"column": "verbatim_copy", "min_value": 0.0, "max_value": cfg.verbatim_copy_rate_max},
                    f"<= {cfg.verbatim_copy_rate_max} of generated anchors repeat a history title",
                )
            ],
        )
    meta: dict[str, Any] = {}
    if warming_up.any():
        warm_up_users = anchors.loc[warming_up.to_numpy(), "user_id"].nunique()
        meta["warm_up"] = (
            f"generator warm-up: no model before its first refit, {warm_up_users} users with a history get "
            "history anchors by design (not counted in fallback_rate)"
        )
    meta |= {
        "anchors": len(anchors),
        "users_with_request": len(users),
        "users_without_anchor": int((users["n_anchors"] < cfg.min_anchors_per_user).sum()) if len(users) else 0,
        "fallback_rate_with_history": fallback_rate if len(judged) else "n/a (no anchor to judge)",
        "warm_up_anchor_share": float(warming_up.mean()) if len(anchors) else 0.0,
        "cold_start_anchor_share": float(cold.mean()) if len(anchors) else 0.0,
        "verbatim_copy_rate": copy_rate if copy_rate is not None else "n/a (no generated anchors)",
        "backends": ", ".join(backends) or "none",
    }
    if not outcomes:
        outcomes = [custom_outcome("rows", True, 0, "any")]
    return suite_result(suite, outcomes, meta)


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
def check_embeddings(
    frame: pd.DataFrame, cfg: EmbeddingThresholds | None = None, column: str = "vector", name: str = "embeddings"
) -> QualityResult:
    """Every vector: the expected (or one common) dimension, L2 norm ~ 1, no NaN/inf."""
    return check_embedding_chunks([frame], cfg, column, name)


def _components(vector) -> np.ndarray:
    """A vector as float64; a NULL component (DuckDB hands a list with NULLs over as a masked array) is NaN."""
    if isinstance(vector, np.ma.MaskedArray):
        return np.ma.filled(vector.astype(np.float64), np.nan)
    return np.asarray(vector, dtype=np.float64)


def _vector_rule_columns(vectors: list) -> pd.DataFrame:
    """Per vector: its dimension, L2 norm and whether every component is finite (stacked per common length)."""
    dims = np.fromiter((len(v) if v is not None else 0 for v in vectors), dtype=np.int64, count=len(vectors))
    norms = np.full(len(vectors), np.nan)
    finite = np.zeros(len(vectors), dtype=bool)
    for length in np.unique(dims[dims > 0]):
        at = np.flatnonzero(dims == length)
        mat = np.stack([_components(vectors[i]) for i in at])
        finite[at] = np.isfinite(mat).all(axis=1)
        norms[at] = np.linalg.norm(mat, axis=1)
    norms[dims == 0] = 0.0
    return pd.DataFrame({"dim": dims, "norm": norms, "finite": finite})


def _vector_rules(dim: int, tol: float) -> list[Rule]:
    return [
        Rule("dimension", "ExpectColumnValuesToBeInSet", {"column": "dim", "value_set": [dim]}, f"== {dim}"),
        Rule(
            "no_nan", "ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]}, "no NaN/inf component"
        ),
        Rule(
            "unit_norm",
            "ExpectColumnValuesToBeBetween",
            {"column": "norm", "min_value": 1 - tol, "max_value": 1 + tol},
            f"L2 norm in [{1 - tol:g}, {1 + tol:g}]",
        ),
    ]


def check_embedding_chunks(
    chunks: Iterable[pd.DataFrame],
    cfg: EmbeddingThresholds | None = None,
    column: str = "vector",
    name: str = "embeddings",
    dim: int | None = None,
) -> QualityResult:
    """The vector rules over one partition given in chunks (one in memory at a time); every rule is a row rule,
    so the chunks' outcomes add up. The expected dimension: ``cfg.dim``, else ``dim`` (the partition's most
    common one, which a caller reading chunks computes first), else the first chunk's most common one."""
    cfg = cfg or EmbeddingThresholds()
    suite = f"{name}_vectors"
    tol = cfg.norm_tolerance
    expected_dim = cfg.dim if cfg.dim is not None else dim
    per_chunk, rows, nan_rows, dims_seen = [], 0, 0, set()
    norm_min, norm_max = np.inf, -np.inf
    rules = None
    for frame in chunks:
        if frame.empty:
            continue
        checked = _vector_rule_columns(frame[column].tolist())
        if rules is None:  # the expected dimension is known by the first chunk at the latest
            if expected_dim is None:
                expected_dim = int(checked["dim"].mode().iloc[0])
            rules = _vector_rules(expected_dim, tol)
        per_chunk.append(validate_rules(suite, checked, rules))
        rows += len(checked)
        nan_rows += int((~checked["finite"]).sum())
        dims_seen |= {int(d) for d in checked["dim"]}
        finite_norms = checked["norm"][np.isfinite(checked["norm"])]
        if len(finite_norms):
            norm_min, norm_max = min(norm_min, finite_norms.min()), max(norm_max, finite_norms.max())
    if not rows:
        return empty_result(suite, True)
    return suite_result(
        suite,
        merge_chunk_outcomes(per_chunk),
        {
            "rows": rows,
            "dim": expected_dim,
            "dims_seen": sorted(dims_seen)[:5],
            "rows_with_nan": nan_rows,
            "norm_min": float(norm_min) if np.isfinite(norm_min) else float("nan"),
            "norm_max": float(norm_max) if np.isfinite(norm_max) else float("nan"),
        },
    )


# ---- events ----------------------------------------------------------------------------------
# Row-level rules: judged on each chunk of a day and added up (merge_chunk_outcomes). A chunk holds whole
# requests, so a repeated (request_id, item_id) pair is always inside one chunk.
EVENT_ROW_RULES = [
    *(
        Rule(f"{c}_not_null", "ExpectColumnValuesToNotBeNull", {"column": c}, "no nulls")
        for c in ("request_id", "user_id", "item_id", "event_time", "exposed")
    ),
    Rule(
        "unique_request_item",
        "ExpectCompoundColumnsToBeUnique",
        {"column_list": ["request_id", "item_id"]},
        "one row per (request_id, item_id)",
    ),
    Rule(
        "click_label_on_exposed_only",
        "ExpectColumnValuesToBeInSet",
        {"column": "click_label_consistent", "value_set": [True]},
        "clicked set exactly on exposed rows",
    ),
    Rule(
        "clicked_binary",
        "ExpectColumnValuesToBeInSet",
        {"column": "clicked_exposed", "value_set": [0.0, 1.0]},
        "clicked in {0, 1}",
    ),
]


def _event_rate_rules(cfg: EventThresholds, n_exposed: int, slice_: str = "") -> list[Rule]:
    """The day's rates: judged once, on the day's totals (a one-row frame whose column means are the rates).
    ``slice_``: "" for the production traffic, "exploration" for the exploration slice's own bounds."""
    prefix = f"{slice_}_" if slice_ else ""
    exposure = (getattr(cfg, f"{prefix}exposure_rate_min"), getattr(cfg, f"{prefix}exposure_rate_max"))
    positive = (getattr(cfg, f"{prefix}positive_rate_min"), getattr(cfg, f"{prefix}positive_rate_max"))
    rules = [
        Rule(
            f"{prefix}exposure_rate",
            "ExpectColumnMeanToBeBetween",
            {"column": f"{prefix}exposed", "min_value": exposure[0], "max_value": exposure[1]},
            f"in [{exposure[0]}, {exposure[1]}]",
        )
    ]
    if n_exposed >= cfg.positive_rate_min_exposed:
        rules.append(
            Rule(
                f"{prefix}positive_rate",
                "ExpectColumnMeanToBeBetween",
                {"column": f"{prefix}clicked_exposed", "min_value": positive[0], "max_value": positive[1]},
                f"clicks/exposed in [{positive[0]}, {positive[1]}]",
            )
        )
    return rules


def _event_rule_columns(events: pd.DataFrame) -> pd.DataFrame:
    """The columns the event rules judge: the ids and time, exposure as 0/1, click-label consistency, and the
    click of exposed rows (NaN elsewhere)."""
    exposed = events["exposed"].astype("boolean")
    clicked = pd.to_numeric(events["clicked"], errors="coerce")
    frame = events[["request_id", "user_id", "item_id", "event_time"]].copy()
    frame["exposed"] = exposed.astype(float)
    frame["click_label_consistent"] = (
        (exposed.fillna(False) & clicked.notna()) | (~exposed.fillna(True) & clicked.isna())
    ).astype(bool)
    frame["clicked_exposed"] = clicked.where(exposed.fillna(False).to_numpy(bool)).astype(float)
    return frame


def check_events(events: pd.DataFrame, cfg: EventThresholds | None = None) -> QualityResult:
    """One day of candidate events in one frame: the data contract (ids and times present, one row per
    request/item, a click label exactly on exposed rows, labels in {0, 1}) and exposure and positive rates
    within bounds."""
    return check_event_chunks([events], cfg)


def check_event_chunks(chunks: Iterable[pd.DataFrame], cfg: EventThresholds | None = None) -> QualityResult:
    """The events suite over one day given as chunks of whole requests (a request's rows all in one chunk),
    one chunk in memory at a time: the row-level rules run through GX on each chunk and add up; the exposure
    and positive rates are summed over the chunks and judged by GX on the day's totals. The result is the
    one a single frame of the day would give."""
    cfg = cfg or EventThresholds()
    suite = "candidate_events"
    per_chunk: list = []
    rows = requests = 0
    # [rows, exposed, clicks] of the production traffic and of the exploration slice, judged apart
    sums = {"": np.zeros(3), "exploration": np.zeros(3)}
    for events in chunks:
        if events.empty:
            continue
        frame = _event_rule_columns(events)
        per_chunk.append(validate_rules(suite, frame, EVENT_ROW_RULES))
        rows += len(frame)
        requests += int(events["request_id"].nunique())
        exploring = (
            events["logging_policy"].isin(cfg.exploration_policies).to_numpy(bool)
            if "logging_policy" in events
            else np.zeros(len(events), bool)
        )
        for name, mask in (("", ~exploring), ("exploration", exploring)):
            part = frame[mask]
            sums[name] += (part["exposed"].count(), part["exposed"].sum(), part["clicked_exposed"].sum())
    if not rows:
        return empty_result(suite, cfg.allow_empty)
    outcomes = merge_chunk_outcomes(per_chunk)
    rates: dict[str, float] = {}
    for name, (n_rows, n_exposed, n_clicks) in sums.items():
        if not n_rows:
            continue  # a day of one kind of traffic only: the other's bounds have nothing to judge
        prefix = f"{name}_" if name else ""
        rates[f"{prefix}exposure_rate"] = float(n_exposed / n_rows)
        rates[f"{prefix}positive_rate"] = float(n_clicks / n_exposed) if n_exposed else float("nan")
        totals = pd.DataFrame(
            {
                f"{prefix}exposed": [rates[f"{prefix}exposure_rate"]],
                f"{prefix}clicked_exposed": [rates[f"{prefix}positive_rate"]],
            }
        )
        outcomes += validate_rules(f"{suite}_rates", totals, _event_rate_rules(cfg, int(n_exposed), name))
    return suite_result(
        suite,
        outcomes,
        {
            "rows": rows,
            "requests": requests,
            "chunks": len(per_chunk),
            "exploration_rows": int(sums["exploration"][0]),
            **rates,
        },
    )
