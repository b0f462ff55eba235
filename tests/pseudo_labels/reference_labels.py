"""The labelling stages as they were before streaming: a whole range of days as one pandas frame.

The oracle the streaming stages (:class:`gpl_platform.pseudo_labels.chain.LabellingChain`) are tested against
(tests/pseudo_labels/test_streaming.py: same similarities, confidences and labels); production never calls it.
The arguments and statistics of the streaming functions before they returned typed results (``pseudo_label_days``
here returns every label as a frame and the statistics as a dict).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.config import CalibrationConfig, ConfidenceConfig
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.pseudo_labels.anchors.base import FALLBACK_EMPTY_HISTORY, AnchorGenerator
from gpl_platform.pseudo_labels.batches import anchor_factors
from gpl_platform.pseudo_labels.confidence import confidence_weights
from gpl_platform.pseudo_labels.day_calibration import day_calibrations, day_degenerate_reason
from gpl_platform.pseudo_labels.encoder import load_item_embeddings
from gpl_platform.pseudo_labels.label_report import no_history_counts
from gpl_platform.pseudo_labels.similarity import score_candidates
from gpl_platform.pseudo_labels.stages import MAIN, NO_HISTORY_RULES, StageTables, as_date, days_param, require_days
from gpl_platform.pseudo_labels.vectors import read_vectors

log = logging.getLogger(__name__)


@dataclass
class DayAnchors:
    """Anchors of a set of days with their vectors; a "user" is a (day, user_id) pair."""

    meta: pd.DataFrame  # day, user_id, anchor_id, gen_prob, is_fallback, fallback_reason, anchor_signature
    vectors: np.ndarray
    user_index: pd.MultiIndex  # (day, user_id) -> position

    def user_idx_of(self, day: pd.Series, user: pd.Series) -> np.ndarray:
        return self.user_index.get_indexer(pd.MultiIndex.from_arrays([day, user]))


def load_day_anchors(
    warehouse: Warehouse, days: Sequence[date], encoder_id: str, anchor_signature: str, tables: StageTables = MAIN
) -> DayAnchors:
    days = sorted(set(days))
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    with warehouse.connect(read_only=True) as con:
        con.register("_days", days_param(days))
        meta, vectors = read_vectors(
            con,
            f"""
            SELECT e.day, e.user_id, e.anchor_id, e.encoder_id, a.gen_prob, a.is_fallback, a.fallback_reason,
                   a.anchor_signature, a.model_id, e.vector
            FROM {tables.embeddings} e JOIN {tables.anchors} a USING (day, anchor_id)
            WHERE e.day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY e.day, e.user_id, a.anchor_rank""",
        )
    meta["day"] = as_date(meta["day"])
    for column, wanted, what in (
        ("encoder_id", encoder_id, "encoder"),
        ("anchor_signature", anchor_signature, "anchor generator"),
    ):
        stale = meta.loc[meta[column] != wanted, "day"]
        if len(stale):
            raise MissingUpstreamDays(
                f"anchors of {stale.nunique()} day(s) (first {stale.min()}) were made with another {what} "
                f"({meta.loc[stale.index[0], column]!r}, expected {wanted!r}); re-materialize user_anchors and "
                "anchor_embeddings for them"
            )
    user_index = pd.MultiIndex.from_frame(meta[["day", "user_id"]].drop_duplicates())
    return DayAnchors(meta.reset_index(drop=True), vectors, user_index)


def score_day_candidates(
    warehouse: Warehouse,
    days: Sequence[date],
    encoder_id: str,
    anchor_signature: str,
    run_id: str | None = None,
    tables: StageTables = MAIN,
) -> dict:
    """Max- and mean-pooled cosine of every candidate (exposed or not) to its user's anchors of that day."""
    days = sorted(set(days))
    require_days(warehouse, "events", days, "candidate scoring")
    anchors = load_day_anchors(warehouse, days, encoder_id, anchor_signature, tables)
    with warehouse.connect(read_only=True) as con:
        con.register("_days", days_param(days))
        cands = con.execute(
            "SELECT day, request_id, user_id, item_id, exposed FROM events "
            "WHERE day IN (SELECT CAST(day AS DATE) FROM _days)"
        ).df()
        item_ids, item_vectors = load_item_embeddings(con, encoder_id)
    cands["day"] = as_date(cands["day"])
    item_pos = pd.Index(item_ids).get_indexer(cands["item_id"])
    if (item_pos < 0).any():
        missing = cands.loc[item_pos < 0, "item_id"].unique()
        raise MissingUpstreamDays(
            f"{len(missing)} candidate item(s) have no embedding under {encoder_id} "
            f"(e.g. {list(missing[:3])}); materialize item_embeddings first"
        )
    anchor_user = anchors.user_idx_of(anchors.meta["day"], anchors.meta["user_id"])
    result = score_candidates(
        anchors.user_idx_of(cands["day"], cands["user_id"]), item_pos, item_vectors, anchors.vectors, anchor_user
    )
    cands["similarity_max"] = result.similarity_max
    cands["similarity_mean"] = result.similarity_mean
    anchor_ids = anchors.meta["anchor_id"].to_numpy()
    cands["anchor_id"] = np.where(result.argmax_anchor >= 0, anchor_ids[np.maximum(result.argmax_anchor, 0)], None)
    cands["encoder_id"], cands["anchor_signature"] = encoder_id, anchor_signature
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.similarities, cands, days, con, run_id)
    covered = ~result.no_anchor
    return {
        "candidates": len(cands),
        "covered": int(covered.sum()),
        "coverage": float(covered.mean()) if len(cands) else 0.0,
        "similarity_max_mean": float(np.nanmean(result.similarity_max)) if covered.any() else float("nan"),
    }


def _history_vectors(
    warehouse: Warehouse, days: Sequence[date], anchors: DayAnchors, item_ids, item_vectors, max_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """History item vectors and, for each, the (day, user) position in ``anchors.user_index``."""
    hist = warehouse.query(
        "SELECT day, user_id, history_item_ids FROM user_histories WHERE day BETWEEN ? AND ?", [min(days), max(days)]
    )
    hist["day"] = as_date(hist["day"])
    hist = hist[hist["day"].isin(days)]
    hist["history_item_ids"] = hist["history_item_ids"].map(lambda ids: list(ids)[:max_items])
    flat = hist.explode("history_item_ids").dropna(subset=["history_item_ids"])
    user_pos = anchors.user_idx_of(flat["day"], flat["user_id"])
    item_pos = pd.Index(item_ids).get_indexer(flat["history_item_ids"])
    keep = (user_pos >= 0) & (item_pos >= 0)
    return item_vectors[item_pos[keep]], user_pos[keep]


def pseudo_label_days(
    warehouse: Warehouse,
    days: Sequence[date],
    first_day: date,
    *,
    encoder_id: str,
    generator: AnchorGenerator,
    calibration_cfg: CalibrationConfig,
    confidence_cfg: ConfidenceConfig,
    history_max_items: int,
    artifacts_dir: Path,
    run_id: str | None = None,
    tables: StageTables = MAIN,
    no_history: str = "none",
) -> tuple[pd.DataFrame, dict]:
    """Pseudo-label every unexposed candidate of ``days`` (GPL steps 3-4).

    Users without a positive history have nothing personal to match: by default (``no_history``
    "none") their candidates get no pseudo-labels; "population" labels them through a calibration
    of their own (fitted on exposed candidates of users without history). A day whose personalized
    calibration carries no ranking in either pooling (:func:`day_degenerate_reason`) gets no labels, with the
    reason in the returned stats, instead of constant labels."""
    if no_history not in NO_HISTORY_RULES:
        raise ValueError(f"no_history must be one of {NO_HISTORY_RULES}, not {no_history!r}")
    days = sorted(set(days))
    signature = generator.lineage_signature()
    require_days(warehouse, tables.similarities, days, "pseudo-labelling")
    segments = ("history", "no_history") if no_history == "population" else ("history",)
    calibrations, labelled_days = day_calibrations(
        warehouse, days, first_day, calibration_cfg, encoder_id, signature, artifacts_dir, tables, segments
    )
    anchors = load_day_anchors(warehouse, days, encoder_id, signature, tables)
    with warehouse.connect(read_only=True) as con:
        con.register("_days", days_param(labelled_days))
        cands = con.execute(f"""
            SELECT s.day, s.request_id, s.user_id, s.item_id, e.event_time, s.similarity_max, s.similarity_mean,
                   s.anchor_id
            FROM {tables.similarities} s JOIN events e USING (day, request_id, item_id)
            WHERE NOT s.exposed AND s.anchor_id IS NOT NULL AND s.day IN (SELECT CAST(day AS DATE) FROM _days)
            ORDER BY s.day, s.request_id, s.item_id""").df()
        n_unexposed = con.execute(
            "SELECT count(*) FROM events WHERE NOT exposed AND day BETWEEN ? AND ?", [days[0], days[-1]]
        ).fetchone()[0]
        item_ids, item_vectors = load_item_embeddings(con, encoder_id)
    cands["day"] = as_date(cands["day"])

    # Confidence factors per anchor, then per candidate through its arg-max anchor.
    meta = anchors.meta
    anchor_user = anchors.user_idx_of(meta["day"], meta["user_id"])
    n_users = len(anchors.user_index)
    hist_vecs, hist_user = _history_vectors(warehouse, days, anchors, item_ids, item_vectors, history_max_items)
    coherence, consistency, generation = anchor_factors(
        anchors.vectors,
        anchor_user,
        n_users,
        hist_vecs,
        hist_user,
        meta["fallback_reason"].eq(FALLBACK_EMPTY_HISTORY).to_numpy(),
        meta["gen_prob"].to_numpy(float),
        confidence_cfg,
        generator.tokens_per_anchor,
    )
    row = pd.Index(meta["anchor_id"] + "@" + meta["day"].astype(str)).get_indexer(
        cands["anchor_id"] + "@" + cands["day"].astype(str)
    )
    cands["c_coherence"], cands["c_history"], cands["c_generation"] = coherence[row], consistency[row], generation[row]
    cands["anchor_is_fallback"] = meta["is_fallback"].to_numpy(bool)[row]
    cands["confidence"] = confidence_weights(
        cands["c_coherence"],
        cands["c_history"],
        cands["c_generation"],
        confidence_cfg.alpha,
        confidence_cfg.beta,
        confidence_cfg.gamma,
        confidence_cfg.w_min,
    )
    # the model that generated each candidate's arg-max anchor (day-bound backends have one per refit period)
    cands["llm_version"] = meta["model_id"].fillna(generator.backend).replace("", generator.backend).to_numpy()[row]
    # Users without history are matched only to the generic anchor: their own segment.
    without_history = meta["fallback_reason"].eq(FALLBACK_EMPTY_HISTORY).to_numpy()[row]
    cands["no_history"] = without_history
    cands["pseudo_label"] = np.nan
    cands["pseudo_label_mean_pool"] = np.nan
    cands["calibration_version"] = ""
    cands["calibration_version_mean_pool"] = ""
    degenerate: dict[str, str] = {}
    for d in labelled_days:
        on_day = (cands["day"] == d).to_numpy()
        for segment in segments:
            rows = on_day & (without_history if segment == "no_history" else ~without_history)
            for pooling, label_col, version_col in (
                ("max", "pseudo_label", "calibration_version"),
                ("mean", "pseudo_label_mean_pool", "calibration_version_mean_pool"),
            ):
                cal = calibrations[(d, pooling, segment)]
                if cal is None:  # a population calibration may lack data: those rows stay unlabelled
                    continue
                cands.loc[rows, label_col] = cal.predict(cands.loc[rows, f"similarity_{pooling}"].to_numpy(float))
                cands.loc[rows, version_col] = cal.version
        personal = on_day & ~without_history
        spreads = {
            pooling: (int(personal.sum()), float(np.std(cands.loc[personal, column])) if personal.any() else 0.0)
            for pooling, column in (("max", "pseudo_label"), ("mean", "pseudo_label_mean_pool"))
        }
        why = day_degenerate_reason(calibrations, d, spreads, calibration_cfg.min_label_std)
        if why:
            degenerate[str(d)] = why
            cands.loc[on_day, ["pseudo_label", "pseudo_label_mean_pool"]] = np.nan
    if degenerate:
        log.warning(
            "%d day(s) get no pseudo-labels because their calibration carries no ranking: %s",
            len(degenerate),
            "; ".join(f"{d}: {why}" for d, why in list(degenerate.items())[:5]),
        )
    cands = cands[cands["pseudo_label"].notna() & cands["pseudo_label_mean_pool"].notna()].reset_index(drop=True)
    cands["prompt_version"] = generator.prompt_version or "none"
    cands["encoder_version"] = encoder_id
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.labels, cands, days, con, run_id)
    with warehouse.connect(read_only=True) as con:
        gap_counts = {"no_history_rule": no_history, **no_history_counts(con, days)}
    stats = {
        "rows": len(cands),
        "unexposed_candidates": int(n_unexposed),
        "coverage": float(len(cands) / n_unexposed) if n_unexposed else 0.0,
        **gap_counts,
        "no_history_labelled": int(cands["no_history"].sum()),
        "days_with_degenerate_calibration": degenerate,
        "days_without_calibration": [str(d) for d in days if d not in labelled_days],
        "calibration_versions": sorted({c.version for c in calibrations.values() if c is not None}),
        "pseudo_label_mean": float(cands["pseudo_label"].mean()) if len(cands) else float("nan"),
        "confidence_mean": float(cands["confidence"].mean()) if len(cands) else float("nan"),
    }
    return cands, stats
