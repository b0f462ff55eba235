"""The pseudo-label ceiling: how well the pseudo-labels rank the unexposed candidates against the oracle,
next to the exposed-only model's own ranking of the same candidates and the Bayes ceiling (the true click
probability as a score, where the source knows it: the best any label or score could do), per window,
anchor variant and segment (docs/EVALUATION.md, "The pseudo-label ceiling")."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import numpy as np
import pandas as pd

from gpl_platform.config import EvaluationConfig
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.metrics import auc
from gpl_platform.evaluation.prerankers import PreRankerSpec

CEILING_SEGMENTS = ("all", "never_exposed_items", "long_tail_items", "long_history_users", "short_history_users")


def load_oracle(warehouse: Warehouse, days: Sequence[date], probability: bool = False) -> pd.DataFrame:
    """The oracle label of ``days``' candidates by (request_id, item_id); with ``probability`` also the true click
    probability (null where the source has none: only the ceiling reads it, never a training or test frame)."""
    columns = "oracle_label, oracle_probability" if probability else "oracle_label"
    frame = warehouse.query(
        f"SELECT request_id, item_id, {columns} FROM oracle_labels WHERE day BETWEEN ? AND ?",
        [min(days), max(days)],
    )
    if probability:
        frame["oracle_probability"] = frame["oracle_probability"].astype("float64")
    return frame


def bayes_auc(labels: np.ndarray, probability: np.ndarray) -> float:
    """AUC of the true click probability against the oracle label: the Bayes ceiling of any score's AUC on
    these candidates (in expectation); NaN where a probability is unknown."""
    probability = np.asarray(probability, dtype=float)
    if np.isnan(probability).any():
        return float("nan")
    return auc(labels, probability)


def ceiling_row(part: pd.DataFrame, model_scores: dict[str, np.ndarray]) -> dict:
    """One row's numbers: ``part`` has the candidates' ``oracle_label``, ``oracle_probability``, ``pseudo_label``,
    ``pseudo_label_mean_pool`` and ``index`` (their rows in each of ``model_scores``, the exposed-only
    models' scores by pre-ranker)."""
    y = part["oracle_label"].to_numpy(int)
    row = {
        "n": len(part),
        "positive_rate": float(y.mean()) if len(y) else float("nan"),
        "pseudo_label_auc_max": auc(y, part["pseudo_label"].to_numpy()),
        "pseudo_label_auc_mean": auc(y, part["pseudo_label_mean_pool"].to_numpy()),
    }
    for name, scores in model_scores.items():
        row[f"exposed_only_auc[{name}]"] = auc(y, scores[part["index"].to_numpy()])
    row["bayes_auc"] = bayes_auc(y, part["oracle_probability"].to_numpy())
    return row


def pseudo_label_ceiling(
    warehouse: Warehouse, shared, exposed_only_models: dict, matrices: dict, evaluation: EvaluationConfig
) -> dict:
    """Pseudo-label AUC against the oracle on unexposed candidates, next to exposed_only's AUC on the
    same candidates and the Bayes ceiling (``bayes_auc``), per window (training days, where labels are
    consumed; validation days, where defaults are chosen), anchor kind, pooling and segment. GPL can only
    add information where its labels rank better than the model's own extrapolation; the distance to
    ``bayes_auc`` is the room any label has left. ``shared``: the offline evaluation's shared inputs."""
    days = shared.split.train_days + shared.split.valid_days
    window_of = {d: "train" for d in shared.split.train_days} | {d: "valid" for d in shared.split.valid_days}
    in_window = shared.in_train | shared.in_valid
    unexposed = in_window & ~shared.cands["exposed"].to_numpy(bool)
    frame = shared.cands[unexposed][["day", "request_id", "user_id", "item_id"]].reset_index(drop=True)
    frame["window"] = frame["day"].map(window_of)
    frame = frame.merge(load_oracle(warehouse, days, probability=True), on=["request_id", "item_id"], how="left")
    exposures = shared.train[shared.train["exposed"]].groupby("item_id").size()
    frame["never_exposed_items"] = frame["item_id"].map(exposures).fillna(0).to_numpy() == 0
    frame["long_tail_items"] = frame["item_id"].isin(shared.longtail)
    histories = warehouse.query(
        "SELECT day, user_id, n_positives FROM user_histories WHERE day BETWEEN ? AND ?", [min(days), max(days)]
    )
    histories["day"] = pd.to_datetime(histories["day"]).dt.date
    n_pos = frame.merge(histories, on=["day", "user_id"], how="left")["n_positives"].fillna(0).to_numpy()
    frame["long_history_users"] = n_pos >= evaluation.long_history_min
    frame["short_history_users"] = (n_pos > 0) & (n_pos < evaluation.long_history_min)
    frame["all"] = True
    model_scores = {}
    for name, model in exposed_only_models.items():
        if model is None:
            continue
        matrix = matrices[PreRankerSpec.parse(name).service][0][unexposed]
        model_scores[name] = model.predict(matrix, frame["user_id"].to_numpy(), frame["item_id"].to_numpy())
    rows = []
    for variant, labels in shared.pseudo.items():
        joined = frame.reset_index().merge(
            labels[["request_id", "item_id", "pseudo_label", "pseudo_label_mean_pool"]], on=["request_id", "item_id"]
        )
        for window in ("train", "valid"):
            for segment in CEILING_SEGMENTS:
                part = joined[(joined["window"] == window) & joined[segment]]
                rows.append(
                    {"window": window, "anchors": variant, "segment": segment, **ceiling_row(part, model_scores)}
                )
    coverage = {variant: int(len(labels)) for variant, labels in shared.pseudo.items()}
    return {"rows": rows, "labelled_candidates": coverage, "unexposed_candidates": int(len(frame))}
