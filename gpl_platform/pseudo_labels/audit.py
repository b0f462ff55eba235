"""Label audit: are GPL's pseudo-labels any good, judged by what users did later?

A candidate that was unexposed (and pseudo-labelled) on day D is sometimes recalled *and exposed*
to the same user on a later day. That later exposure carries a real click label. Joining the two
gives the production measure of pseudo-label quality: calibration of ``pseudo_label`` against later
real clicks (reliability table by label bin), by lag (days between D and the exposure) and over
time (per labelled day). Only ``events`` (exposed rows with a click label) is read as ground truth.

Caveat, shown with the results: later exposure is not random (the exposure policy picks popular
items), so these pairs are a biased sample of the unexposed candidates. It measures what can be
measured in production; the offline benchmark (docs/EVALUATION.md) measures the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from gpl_platform.data.warehouse import Warehouse

PAIR_COLUMNS = [
    "label_day",
    "request_id",
    "user_id",
    "item_id",
    "pseudo_label",
    "confidence",
    "exposure_day",
    "exposure_request_id",
    "lag_days",
    "clicked",
]
DEFAULT_LAG_EDGES = (1, 2, 4, 8, 15, 31)


@dataclass
class AuditResult:
    pairs: pd.DataFrame  # one row per pseudo-labelled candidate later exposed to the same user
    reliability: pd.DataFrame  # by pseudo-label bin: n, mean label, click rate, gap
    by_lag: pd.DataFrame  # by lag bucket
    by_day: pd.DataFrame  # by labelled day (calibration over time)
    summary: dict = field(default_factory=dict)


def join_later_exposures(
    labels: pd.DataFrame,
    events: pd.DataFrame,
    horizon_days: int | None = None,
) -> pd.DataFrame:
    """Pair each pseudo-label of day D with the FIRST later exposure (event day > D, exposed, click
    label present) of the same (user_id, item_id), within ``horizon_days`` if given.

    ``labels``: day, request_id, user_id, item_id, pseudo_label, confidence.
    ``events``: day, request_id, user_id, item_id, event_time, exposed, clicked.
    """
    if labels.empty or events.empty:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    lab = labels[["day", "request_id", "user_id", "item_id", "pseudo_label", "confidence"]].copy()
    lab["label_day"] = pd.to_datetime(lab.pop("day")).dt.normalize()
    ev = events[events["exposed"].astype(bool) & events["clicked"].notna()]
    ev = ev[["day", "request_id", "user_id", "item_id", "event_time", "clicked"]].rename(
        columns={"day": "exposure_day", "request_id": "exposure_request_id"}
    )
    ev["exposure_day"] = pd.to_datetime(ev["exposure_day"]).dt.normalize()
    joined = lab.merge(ev, on=["user_id", "item_id"], how="inner")
    joined = joined[joined["exposure_day"] > joined["label_day"]]
    joined["lag_days"] = (joined["exposure_day"] - joined["label_day"]).dt.days.astype(int)
    if horizon_days is not None:
        joined = joined[joined["lag_days"] <= horizon_days]
    joined = joined.sort_values(
        ["label_day", "request_id", "item_id", "event_time", "exposure_request_id"]
    ).drop_duplicates(["label_day", "request_id", "item_id"], keep="first")
    joined["clicked"] = joined["clicked"].astype(int)
    joined["label_day"] = joined["label_day"].dt.date
    joined["exposure_day"] = joined["exposure_day"].dt.date
    return joined[PAIR_COLUMNS].reset_index(drop=True)


def _calibration_stats(group: pd.DataFrame) -> pd.Series:
    y, p, w = (
        group["clicked"].to_numpy(float),
        group["pseudo_label"].to_numpy(float),
        group["confidence"].to_numpy(float),
    )
    n = len(group)
    return pd.Series(
        {
            "n": n,
            "mean_pseudo_label": float(p.mean()) if n else np.nan,
            "click_rate": float(y.mean()) if n else np.nan,
            "gap": float(p.mean() - y.mean()) if n else np.nan,
            "brier": float(np.mean((p - y) ** 2)) if n else np.nan,
            "mean_confidence": float(w.mean()) if n else np.nan,
        }
    )


def _grouped(pairs: pd.DataFrame, key: pd.Series | str, name: str) -> pd.DataFrame:
    cols = ["n", "mean_pseudo_label", "click_rate", "gap", "brier", "mean_confidence"]
    if pairs.empty:
        return pd.DataFrame(columns=[name, *cols])
    rows = []
    for value, group in pairs.groupby(key, observed=True, sort=True):
        rows.append({name: value, **_calibration_stats(group).to_dict()})
    out = pd.DataFrame(rows, columns=[name, *cols])
    out["n"] = out["n"].astype(int)
    return out


def reliability_table(pairs: pd.DataFrame, n_bins: int = 10) -> pd.DataFrame:
    """Calibration by equal-width pseudo-label bin on [0, 1]: a well calibrated labeller has
    click_rate ~ mean_pseudo_label in every bin. Empty bins are left out."""
    edges = np.linspace(0, 1, n_bins + 1)
    names = [
        f"[{a:.2f}, {b:.2f}{']' if i == n_bins - 1 else ')'}" for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))
    ]
    if pairs.empty:
        return _grouped(pairs, "pseudo_label", "pseudo_label_bin")
    idx = np.clip(np.floor(pairs["pseudo_label"].to_numpy(float) * n_bins).astype(int), 0, n_bins - 1)
    key = pd.Series(pd.Categorical([names[i] for i in idx], categories=names, ordered=True), index=pairs.index)
    return _grouped(pairs.assign(_bin=key), "_bin", "pseudo_label_bin")


def lag_bucket(lag_days: pd.Series, edges: Sequence[int] = DEFAULT_LAG_EDGES) -> pd.Series:
    """'1d', '2-3d', '4-7d', ... from the day difference; the last bucket is open ('31d+')."""
    edges = list(edges)
    names = []
    for a, b in zip(edges[:-1], edges[1:]):
        names.append(f"{a}d" if b - a == 1 else f"{a}-{b - 1}d")
    names.append(f"{edges[-1]}d+")
    idx = np.searchsorted(np.asarray(edges), lag_days.to_numpy(int), side="right") - 1
    return pd.Series(pd.Categorical([names[i] for i in idx], categories=names, ordered=True), index=lag_days.index)


def expected_calibration_error(pairs: pd.DataFrame, n_bins: int = 10) -> float:
    """Count-weighted mean |mean pseudo-label - click rate| over label bins (ECE)."""
    table = reliability_table(pairs, n_bins)
    if table.empty or table["n"].sum() == 0:
        return float("nan")
    return float((table["gap"].abs() * table["n"]).sum() / table["n"].sum())


def audit(
    pairs: pd.DataFrame, n_bins: int = 10, lag_edges: Sequence[int] = DEFAULT_LAG_EDGES, n_labels: int | None = None
) -> AuditResult:
    """Reliability, by-lag and by-day tables and a summary from :func:`join_later_exposures` pairs."""
    reliability = reliability_table(pairs, n_bins)
    by_lag = _grouped(
        pairs.assign(_lag=lag_bucket(pairs["lag_days"], lag_edges)) if len(pairs) else pairs,
        "_lag" if len(pairs) else "lag_days",
        "lag",
    )
    by_day = _grouped(pairs, "label_day", "label_day")
    if len(by_day):
        by_day["ece"] = [expected_calibration_error(g, n_bins) for _, g in pairs.groupby("label_day", sort=True)]
    n = len(pairs)
    summary = {
        "pairs": n,
        "labelled_candidates": n_labels if n_labels is not None else "unknown",
        "later_exposed_share": (n / n_labels) if n_labels else float("nan"),
        "mean_pseudo_label": float(pairs["pseudo_label"].mean()) if n else float("nan"),
        "later_click_rate": float(pairs["clicked"].mean()) if n else float("nan"),
        "ece": expected_calibration_error(pairs, n_bins) if n else float("nan"),
        "brier": float(np.mean((pairs["pseudo_label"].astype(float) - pairs["clicked"]) ** 2)) if n else float("nan"),
        "brier_of_constant": float(pairs["clicked"].mean() * (1 - pairs["clicked"].mean())) if n else float("nan"),
        "auc": _auc(pairs["pseudo_label"].to_numpy(float), pairs["clicked"].to_numpy(int)) if n else float("nan"),
        "label_days": int(pairs["label_day"].nunique()) if n else 0,
    }
    return AuditResult(pairs, reliability, by_lag, by_day, summary)


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


def load_audit_inputs(
    warehouse: Warehouse, label_days: Sequence[date] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pseudo-labels (of ``label_days``, default all) and the exposed, labelled events of the same
    (user, item) pairs on later days, from the warehouse."""
    where, params = "", []
    if label_days is not None:
        where, params = "WHERE day IN (SELECT unnest(?::DATE[]))", [sorted(set(label_days))]
    with warehouse.connect(read_only=True) as con:
        labels = con.execute(
            f"SELECT day, request_id, user_id, item_id, pseudo_label, confidence FROM pseudo_labels {where}", params
        ).df()
        con.register("_labels", labels)
        events = con.execute("""
            SELECT e.day, e.request_id, e.user_id, e.item_id, e.event_time, e.exposed, e.clicked
            FROM events e
            WHERE e.exposed AND e.clicked IS NOT NULL
              AND e.day > (SELECT min(CAST(day AS DATE)) FROM _labels)
              AND EXISTS (SELECT 1 FROM _labels l WHERE l.user_id = e.user_id AND l.item_id = e.item_id)""").df()
        con.unregister("_labels")
    return labels, events


def audit_warehouse(
    warehouse: Warehouse, label_days: Sequence[date] | None = None, horizon_days: int | None = None, n_bins: int = 10
) -> AuditResult:
    labels, events = load_audit_inputs(warehouse, label_days)
    return audit(join_later_exposures(labels, events, horizon_days), n_bins, n_labels=len(labels))
