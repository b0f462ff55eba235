"""Training data: the time split, candidates, pseudo-labels, Feast features, and per-method rows.

Nothing here reads oracle labels: training sees exposed clicks and pseudo-labels only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from gpl_platform.prerank.train import TrainingRows
from gpl_platform.warehouse import Warehouse

log = logging.getLogger(__name__)

METHODS = ("exposed_only", "unexposed_negative", "ranker_distillation", "ips", "gpl", "gpl_no_confidence",
           "gpl_mean_pool", "gpl_history_anchors", "pseudo_only")


class TrainingConfig(BaseModel):
    """How training sets are built (GPL_METHOD.md step 5 and the baselines)."""

    test_share: float = Field(0.2, gt=0, lt=1, description="last share of requests (by day) held out for testing")
    valid_share: float = Field(0.1, gt=0, lt=1, description="share of requests before the test days for early stopping")
    pseudo_weight: float = Field(1.0, ge=0, description="lambda: weight of the pseudo-label loss")
    negative_sample_rate: float = Field(0.3, gt=0, le=1, description="unexposed_negative: share of unexposed rows kept")
    ips_clip: float = Field(20.0, gt=1, description="largest inverse-propensity weight")
    feature_service: str = "prerank_v1"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    epochs: int = Field(15, gt=0)
    batch_size: int = Field(2048, gt=0)
    lr: float = Field(3e-3, gt=0)
    patience: int = Field(2, gt=0)


@dataclass
class TimeSplit:
    train_days: list[date]
    valid_days: list[date]
    test_days: list[date]

    def describe(self) -> dict:
        return {name: [str(days[0]), str(days[-1]), len(days)] if days else [] for name, days in asdict(self).items()}


def time_split(warehouse: Warehouse, test_share: float, valid_share: float) -> TimeSplit:
    """Days in order; the last ``test_share`` of requests are test, the ``valid_share`` before them validation."""
    per_day = warehouse.query("SELECT day, count(DISTINCT request_id) AS n FROM events GROUP BY day ORDER BY day")
    if per_day.empty:
        raise ValueError("no events in the warehouse: materialize the ingestion assets first")
    per_day["day"] = pd.to_datetime(per_day["day"]).dt.date
    share = per_day["n"].cumsum() / per_day["n"].sum()
    test = per_day["day"][share > 1 - test_share].tolist()
    valid = per_day["day"][(share > 1 - test_share - valid_share) & (share <= 1 - test_share)].tolist()
    train = per_day["day"][share <= 1 - test_share - valid_share].tolist()
    if not (train and valid and test):
        raise ValueError(f"time split left an empty part (train {len(train)}, valid {len(valid)}, test {len(test)} days)")
    return TimeSplit(train, valid, test)


def load_candidates(warehouse: Warehouse, days: Sequence[date]) -> pd.DataFrame:
    frame = warehouse.query(
        "SELECT day, request_id, user_id, item_id, event_time, exposed, clicked FROM events "
        "WHERE day BETWEEN ? AND ? ORDER BY day, request_id, item_id", [min(days), max(days)])
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame[frame["day"].isin(set(days))].reset_index(drop=True)


def load_pseudo_labels(warehouse: Warehouse, days: Sequence[date], table: str = "pseudo_labels") -> pd.DataFrame:
    frame = warehouse.query(
        f"SELECT day, request_id, item_id, pseudo_label, pseudo_label_mean_pool, confidence, llm_version, "
        f"prompt_version, encoder_version, calibration_version FROM {table} WHERE day BETWEEN ? AND ?",
        [min(days), max(days)])
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame[frame["day"].isin(set(days))].reset_index(drop=True)


def pseudo_label_lineage(warehouse: Warehouse, days: Sequence[date], table: str = "pseudo_labels") -> dict:
    """Versions behind the pseudo-labels of ``days``: models, prompt, calibrations, and a digest of the
    partitions' write records (it changes whenever any of those partitions is rewritten)."""
    versions = warehouse.query(
        f"SELECT DISTINCT llm_version, prompt_version, encoder_version, calibration_version FROM {table} "
        "WHERE day BETWEEN ? AND ?", [min(days), max(days)])
    parts = warehouse.query("SELECT day, n_rows, written_at FROM partitions WHERE table_name = ? "
                            "AND day BETWEEN ? AND ? ORDER BY day", [table, min(days), max(days)])
    digest = hashlib.sha256(parts.to_csv(index=False).encode()).hexdigest()[:12]
    return {"table": table, "llm_versions": sorted(versions["llm_version"].unique()),
            "prompt_versions": sorted(versions["prompt_version"].unique()),
            "encoder_versions": sorted(versions["encoder_version"].unique()),
            "calibration_versions": sorted(versions["calibration_version"].unique()),
            "partitions": [str(min(days)), str(max(days))], "table_version": digest}


def attach_features(store, candidates: pd.DataFrame, service: str) -> tuple[np.ndarray, list[str]]:
    """Point-in-time Feast features of every candidate row, as the model's float32 matrix."""
    from gpl_platform.features.serving import feature_matrix

    entity = candidates[["user_id", "item_id", "event_time"]]
    frame = store.historical_features(entity, service=service)
    return feature_matrix(frame, store.spec(), service)


# ---- per-method training rows -----------------------------------------------------------------

def exposure_propensity(matrix: np.ndarray, columns: list[str], candidates: pd.DataFrame) -> np.ndarray:
    """P(exposed | item popularity, request size), fitted on the logged exposures of the training days:
    what a team without the policy's internals can estimate from its own logs."""
    from sklearn.linear_model import LogisticRegression

    col = {c: k for k, c in enumerate(columns)}
    size = candidates.groupby("request_id")["item_id"].transform("size").to_numpy(float)
    x = np.column_stack([np.log1p(matrix[:, col["i_exposures"]]), np.log1p(matrix[:, col["i_candidates"]]),
                         np.log(size)])
    y = candidates["exposed"].to_numpy(int)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    return model.predict_proba(x)[:, 1]


def fit_teacher(matrix: np.ndarray, labels: np.ndarray, seed: int):
    """The "ranker" of the distillation baseline: a heavier model (gradient-boosted trees) on exposed data."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.08, max_leaf_nodes=63,
                                          random_state=seed).fit(matrix, labels)


def method_rows(method: str, train: pd.DataFrame, matrix: np.ndarray, pseudo: dict[str, pd.DataFrame],
                cfg: TrainingConfig, seed: int, teacher_scores: np.ndarray | None = None,
                propensity: np.ndarray | None = None) -> TrainingRows:
    """TrainingRows of ``method`` over the training candidates ``train`` (rows aligned with ``matrix``).

    ``pseudo`` maps "main" and "history" to pseudo-label frames keyed by (request_id, item_id).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    exposed = train["exposed"].to_numpy(bool)
    idx_exp = np.flatnonzero(exposed)
    actual = (idx_exp, train["clicked"].to_numpy(float)[idx_exp], np.ones(len(idx_exp)))
    lam = cfg.pseudo_weight
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
    if method != "pseudo_only":
        weights = actual[2]
        if method == "ips":
            if propensity is None:
                raise ValueError("ips needs propensities")
            w = np.minimum(1.0 / np.maximum(propensity[idx_exp], 1e-6), cfg.ips_clip)
            weights = w / w.mean()
        parts.append((actual[0], actual[1], weights, False))
    idx_unexp = np.flatnonzero(~exposed)
    if method == "unexposed_negative":
        rng = np.random.default_rng(seed)
        keep = idx_unexp[rng.random(len(idx_unexp)) < cfg.negative_sample_rate]
        parts.append((keep, np.zeros(len(keep)), np.ones(len(keep)), True))
    elif method == "ranker_distillation":
        if teacher_scores is None:
            raise ValueError("ranker_distillation needs teacher scores")
        parts.append((idx_unexp, teacher_scores[idx_unexp], np.full(len(idx_unexp), lam), True))
    elif method.startswith("gpl") or method == "pseudo_only":
        table = pseudo["history" if method == "gpl_history_anchors" else "main"]
        keys = pd.MultiIndex.from_frame(train[["request_id", "item_id"]])
        pos = pd.MultiIndex.from_frame(table[["request_id", "item_id"]]).get_indexer(keys)
        rows = np.flatnonzero((~exposed) & (pos >= 0))
        src = pos[rows]
        label_col = "pseudo_label_mean_pool" if method == "gpl_mean_pool" else "pseudo_label"
        labels = table[label_col].to_numpy(float)[src]
        conf = table["confidence"].to_numpy(float)[src]
        weight = np.full(len(rows), lam) if method == "gpl_no_confidence" else lam * conf
        if method == "pseudo_only":
            weight = conf
        parts.append((rows, labels, weight, True))
    idx = np.concatenate([p[0] for p in parts])
    return TrainingRows(matrix[idx], np.concatenate([p[1] for p in parts]).astype(np.float32),
                        np.concatenate([p[2] for p in parts]).astype(np.float32),
                        np.concatenate([np.full(len(p[0]), p[3]) for p in parts]))
