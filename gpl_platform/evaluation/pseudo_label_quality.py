"""How good are the pseudo-labels? AUC against the oracle labels of unexposed candidates.

Every anchor variant goes through the same code as the pipeline (histories -> anchors, cached in
the warehouse -> frozen encoder -> max/mean pooling) over the same unexposed candidates; only the
anchor generator differs. The calibration is monotone within a refit period, so the similarity's
ranking is the pseudo-label's ranking; the pipeline's own calibrated labels are scored too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.metrics import auc, gauc
from gpl_platform.pseudo_labels.anchor_stages import anchors_for_days
from gpl_platform.pseudo_labels.anchors import AnchorGenerator
from gpl_platform.pseudo_labels.encoder import load_item_embeddings
from gpl_platform.pseudo_labels.similarity import score_candidates

log = logging.getLogger(__name__)


def unexposed_candidates(warehouse: Warehouse, days: Sequence[date]) -> pd.DataFrame:
    frame = warehouse.query(
        "SELECT e.day, e.request_id, e.user_id, e.item_id, o.oracle_label FROM events e "
        "JOIN oracle_labels o USING (day, request_id, item_id) "
        "WHERE NOT e.exposed AND o.oracle_label IS NOT NULL AND e.day BETWEEN ? AND ?",
        [min(days), max(days)],
    )
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame[frame["day"].isin(set(days))].reset_index(drop=True)


def variant_similarities(
    warehouse: Warehouse,
    days: Sequence[date],
    candidates: pd.DataFrame,
    generator: AnchorGenerator,
    encoder,
    k: int,
    history_max_items: int,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(similarity_max, similarity_mean, stats) of ``candidates`` under ``generator``'s anchors."""
    anchors, stats = anchors_for_days(warehouse, days, generator, k, history_max_items, progress)
    with warehouse.connect(read_only=True) as con:
        item_ids, item_vectors = load_item_embeddings(con, encoder.encoder_id)
    vectors = generator.anchor_vectors(anchors["anchor_text"].tolist(), encoder)
    users = pd.MultiIndex.from_frame(anchors[["day", "user_id"]].drop_duplicates())
    anchor_user = users.get_indexer(pd.MultiIndex.from_frame(anchors[["day", "user_id"]]))
    cand_user = users.get_indexer(pd.MultiIndex.from_frame(candidates[["day", "user_id"]]))
    result = score_candidates(
        cand_user, pd.Index(item_ids).get_indexer(candidates["item_id"]), item_vectors, vectors, anchor_user
    )
    stats["fallback_anchor_share"] = float(anchors["is_fallback"].mean()) if len(anchors) else 0.0
    # from the anchors themselves (the generator's counters cover only what was not in the cache)
    stats["fallback_anchors_by_reason"] = {str(k): int(v) for k, v in anchors["fallback_reason"].value_counts().items()}
    return result.similarity_max, result.similarity_mean, stats


def pseudo_label_quality(
    warehouse: Warehouse,
    days: Sequence[date],
    generators: dict[str, AnchorGenerator],
    encoder,
    k: int,
    history_max_items: int,
    seed: int,
    dataset: str,
    progress: bool = True,
) -> dict:
    """The `gpl bench pseudo-labels` report: for each named generator (e.g. ``llm``, ``history``,
    ``sid``), AUC and GAUC of max- and mean-pooled similarity as ``<name>_max`` / ``<name>_mean``."""
    cands = unexposed_candidates(warehouse, days)
    if cands.empty:
        raise ValueError("no unexposed candidates with oracle labels in the selected days")
    y = cands["oracle_label"].to_numpy(int)
    # Users without history get the same generic anchor under every backend, so the variants differ only
    # on the candidates of users with a history: the AUC restricted to those is reported too.
    with_history = _has_history(warehouse, days, cands)
    report: dict = {
        "dataset": dataset,
        "n_candidates": int(len(cands)),
        "positive_rate": float(y.mean()),
        "days": [str(min(days)), str(max(days))],
        "auc": {},
        "gauc": {},
        "n_candidates_of_users_with_history": int(with_history.sum()),
        "auc_users_with_history": {},
        "gauc_users_with_history": {},
        "variants": {},
    }
    for name, generator in generators.items():
        log.info("scoring %d unexposed candidates with %s anchors", len(cands), generator.backend)
        s_max, s_mean, stats = variant_similarities(
            warehouse, days, cands, generator, encoder, k, history_max_items, progress
        )
        covered = ~np.isnan(s_max)
        report["variants"][name] = {
            "backend": generator.backend,
            "model_id": generator.model_id,
            "prompt_version": generator.prompt_version,
            "coverage": float(covered.mean()),
            "fallback_anchor_share": stats["fallback_anchor_share"],
            "serving_models": stats["serving_models"],
            "fallback_anchors_by_reason": stats["fallback_anchors_by_reason"],
        }
        for pooling, scores in (("max", s_max), ("mean", s_mean)):
            filled = np.where(covered, scores, np.nanmin(scores) - 1)  # uncovered rank last
            report["auc"][f"{name}_{pooling}"] = auc(y, filled)
            report["gauc"][f"{name}_{pooling}"] = gauc(cands["user_id"].to_numpy(), y, filled)
            h = with_history
            report["auc_users_with_history"][f"{name}_{pooling}"] = auc(y[h], filled[h])
            report["gauc_users_with_history"][f"{name}_{pooling}"] = gauc(
                cands["user_id"].to_numpy()[h], y[h], filled[h]
            )
    rng = np.random.default_rng(seed)
    noise = rng.random(len(cands))
    report["auc"]["random"] = auc(y, noise)
    report["gauc"]["random"] = gauc(cands["user_id"].to_numpy(), y, noise)
    report["auc_users_with_history"]["random"] = auc(y[with_history], noise[with_history])
    report.update(_pipeline_label_quality(warehouse, days))
    return report


def _has_history(warehouse: Warehouse, days: Sequence[date], cands: pd.DataFrame) -> np.ndarray:
    hist = warehouse.query(
        "SELECT day, user_id, len(history_item_ids) > 0 AS has FROM user_histories WHERE day BETWEEN ? AND ?",
        [min(days), max(days)],
    )
    hist["day"] = pd.to_datetime(hist["day"]).dt.date
    merged = cands[["day", "user_id"]].merge(hist, on=["day", "user_id"], how="left")
    return merged["has"].fillna(False).to_numpy(bool)


def _pipeline_label_quality(warehouse: Warehouse, days: Sequence[date]) -> dict:
    """The pipeline's own calibrated pseudo-labels and confidence weights against the oracle."""
    labels = warehouse.query(
        "SELECT p.pseudo_label, p.confidence, p.user_id, o.oracle_label FROM pseudo_labels p "
        "JOIN oracle_labels o USING (day, request_id, item_id) WHERE p.day BETWEEN ? AND ? "
        "AND o.oracle_label IS NOT NULL",
        [min(days), max(days)],
    )
    if labels.empty:
        return {"pipeline_pseudo_label_auc": None, "confidence_correctness_spearman": None, "pipeline_pseudo_labels": 0}
    y = labels["oracle_label"].to_numpy(int)
    correctness = 1.0 - np.abs(labels["pseudo_label"].to_numpy(float) - y)
    rho = spearmanr(labels["confidence"], correctness).statistic
    high = labels["confidence"] >= labels["confidence"].median()
    return {
        "pipeline_pseudo_label_auc": auc(y, labels["pseudo_label"].to_numpy(float)),
        "pipeline_pseudo_labels": int(len(labels)),
        "confidence_correctness_spearman": float(rho),
        "auc_high_confidence_half": auc(y[high], labels.loc[high, "pseudo_label"].to_numpy(float)),
        "auc_low_confidence_half": auc(y[~high], labels.loc[~high, "pseudo_label"].to_numpy(float)),
    }
