"""Offline evaluation: every method trained on the same rows and features, scored on the test days'
whole candidate set against the oracle labels (GPL_METHOD.md "Evaluation here")."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.config import TrainingConfig
from gpl_platform.quality import failing_label_days
from gpl_platform.evaluation.metrics import auc, coverage_at_k, diversity_at_k, gauc, hit_rate_at_k
from gpl_platform.prerank.data import (
    METHODS,
    PSEUDO_VARIANT_OF_METHOD,
    TimeSplit,
    attach_features,
    exposure_propensity,
    fit_teacher,
    load_candidates,
    load_pseudo_labels,
    method_plan,
    pseudo_label_lineage,
    rows_from_plan,
    time_split,
)
from gpl_platform.prerank.train import TrainConfig, train_preranker
from gpl_platform.warehouse import Warehouse

log = logging.getLogger(__name__)
METRICS = ("auc", "gauc", "hr@3", "hr@5", "hr@10", "unexposed_auc", "unexposed_hr@10", "longtail_hr@10",
           "coverage@10", "diversity@10")


def long_tail_items(train: pd.DataFrame, head_share: float = 0.8) -> set[str]:
    """Items outside the smallest head set holding ``head_share`` of the training days' exposures."""
    exposures = train[train["exposed"]].groupby("item_id").size().sort_values(ascending=False)
    cum = exposures.cumsum() / exposures.sum()
    head = set(exposures.index[: int(np.searchsorted(cum.to_numpy(), head_share)) + 1])
    return set(train["item_id"].unique()) - head


def candidate_set_metrics(test: pd.DataFrame, scores: np.ndarray, longtail: set[str], item_vectors: dict) -> dict:
    y = test["oracle_label"].to_numpy(int)
    req, users, items = test["request_id"].to_numpy(), test["user_id"].to_numpy(), test["item_id"].to_numpy()
    unexp = ~test["exposed"].to_numpy(bool)
    tail = test["item_id"].isin(longtail).to_numpy()
    return {
        "auc": auc(y, scores), "gauc": gauc(users, y, scores),
        "hr@3": hit_rate_at_k(req, y, scores, 3), "hr@5": hit_rate_at_k(req, y, scores, 5),
        "hr@10": hit_rate_at_k(req, y, scores, 10),
        "unexposed_auc": auc(y[unexp], scores[unexp]),
        "unexposed_hr@10": hit_rate_at_k(req[unexp], y[unexp], scores[unexp], 10),
        "longtail_hr@10": hit_rate_at_k(req[tail], y[tail], scores[tail], 10),
        "coverage@10": coverage_at_k(req, items, scores, 10),
        "diversity@10": diversity_at_k(req, items, scores, item_vectors, 10),
    }


def load_oracle(warehouse: Warehouse, days: Sequence[date]) -> pd.DataFrame:
    frame = warehouse.query("SELECT day, request_id, item_id, oracle_label FROM oracle_labels WHERE day BETWEEN ? AND ?",
                            [min(days), max(days)])
    return frame.drop(columns=["day"])


def _item_vectors(warehouse: Warehouse) -> dict:
    from gpl_platform.vectors import read_vectors

    with warehouse.connect(read_only=True) as con:
        meta, vectors = read_vectors(con, "SELECT item_id, vector FROM item_embeddings")
    return dict(zip(meta["item_id"], vectors))


def run_offline_evaluation(warehouse: Warehouse, store, cfg: TrainingConfig, dataset: str,
                           methods: Sequence[str] = METHODS, seeds: Sequence[int] | None = None,
                           label_gate=None) -> dict:
    """Train every method under every seed; return the report (JSON shape of the evaluation issue)
    plus details for plots."""
    seeds = list(seeds if seeds is not None else cfg.seeds)
    began = time.perf_counter()
    split: TimeSplit = time_split(warehouse, cfg.test_share, cfg.valid_share)
    days = split.train_days + split.valid_days + split.test_days
    cands = load_candidates(warehouse, days)
    log.info("retrieving point-in-time features for %d candidates", len(cands))
    matrix, columns = attach_features(store, cands, cfg.feature_service)
    in_train = cands["day"].isin(set(split.train_days)).to_numpy()
    in_valid = cands["day"].isin(set(split.valid_days)).to_numpy()
    in_test = cands["day"].isin(set(split.test_days)).to_numpy()
    train, train_x = cands[in_train].reset_index(drop=True), matrix[in_train]
    valid_exposed = in_valid & cands["exposed"].to_numpy(bool)
    valid_x, valid_y = matrix[valid_exposed], cands.loc[valid_exposed, "clicked"].to_numpy(int)
    test = cands[in_test].reset_index(drop=True).merge(load_oracle(warehouse, split.test_days),
                                                     on=["request_id", "item_id"], how="left")
    if test["oracle_label"].isna().any():
        raise ValueError(f"{int(test['oracle_label'].isna().sum())} test candidates have no oracle label: "
                         "offline evaluation needs a benchmark source")
    test_x = matrix[in_test]
    # The same quality gate as training_set: days whose labels fail it are not consumed.
    refused: dict[str, list[str]] = {}
    pseudo = {}
    variants = ["main"] + [PSEUDO_VARIANT_OF_METHOD[m] for m in methods if m in PSEUDO_VARIANT_OF_METHOD]
    for name in variants:
        table = "pseudo_labels" if name == "main" else f"pseudo_labels__{name}"
        failing = failing_label_days(warehouse, split.train_days, label_gate, table=table)
        refused[name] = sorted(str(d) for d in failing)
        pseudo[name] = load_pseudo_labels(warehouse, [d for d in split.train_days if d not in failing], table)
    propensity = exposure_propensity(train_x, columns, train) if "ips" in methods else None
    longtail = long_tail_items(train)
    item_vectors = _item_vectors(warehouse)
    train_exposed = train["exposed"].to_numpy(bool)

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    test_scores: dict[str, np.ndarray] = {}
    for seed in seeds:
        teacher_scores = None
        if "ranker_distillation" in methods:
            teacher = fit_teacher(train_x[train_exposed], train.loc[train_exposed, "clicked"].to_numpy(int), seed)
            teacher_scores = teacher.predict_proba(train_x)[:, 1]
        for method in methods:
            plan = method_plan(method, train, pseudo, cfg, seed, teacher_scores, propensity)
            if plan.empty:
                raise ValueError(f"method {method}: no training rows over {split.describe()['train_days']} "
                                 "(no pseudo-labels on the training days?)")
            rows = rows_from_plan(plan, train_x)
            model, history = train_preranker(rows, columns, valid_x, valid_y, config=TrainConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience, seed=seed))
            scores = model.predict(test_x)
            metrics = candidate_set_metrics(test, scores, longtail, item_vectors)
            runs[method].append({"seed": seed, **metrics, "train": {k: history[k] for k in
                                 ("epochs_run", "best_epoch", "best_valid_auc", "n_rows", "n_pseudo", "seconds")}})
            test_scores.setdefault(method, scores)
            log.info("seed %d %-20s auc %.4f gauc %.4f hr@10 %.4f unexposed_auc %.4f (%d rows, %.1fs)", seed,
                     method, metrics["auc"], metrics["gauc"], metrics["hr@10"], metrics["unexposed_auc"],
                     history["n_rows"], history["seconds"])

    summary = {m: {k: {"mean": float(np.nanmean([r[k] for r in rs])), "std": float(np.nanstd([r[k] for r in rs]))}
                   for k in METRICS} for m, rs in runs.items()}
    pseudo_main = load_pseudo_labels(warehouse, split.train_days).merge(load_oracle(warehouse, split.train_days), on=["request_id", "item_id"])
    return {
        "dataset": dataset, "seeds": seeds, "methods": summary,
        "split": split.describe(),
        "n_test_requests": int(test["request_id"].nunique()), "n_test_candidates": int(len(test)),
        "n_train_candidates": int(len(train)), "feature_service": cfg.feature_service,
        "training_config": cfg.model_dump(), "pseudo_label_lineage": pseudo_label_lineage(warehouse, split.train_days),
        "long_tail_items": len(longtail),
        "pseudo_label_days_refused_by_quality_gate": {k: len(v) for k, v in refused.items()},
        "pseudo_label_days_in_training_window": len(split.train_days), "seconds": round(time.perf_counter() - began, 1),
        "runs": runs,
        "_details": {"pseudo_main": pseudo_main[["pseudo_label", "confidence", "oracle_label"]]},
    }


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """``out`` (JSON), and beside it a markdown report with plots (PNG)."""
    import json
    import os

    from gpl_platform.evaluation.report import render_markdown

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(public, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    markdown = render_markdown(report, out.parent, stem=out.stem)
    return {"json": out, "markdown": markdown}
