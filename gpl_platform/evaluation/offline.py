"""Offline evaluation: every method trained on the same rows and features, scored on the test days'
whole candidate set against the oracle labels (docs/METHOD.md "Evaluation metrics")."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gpl_platform.config import ConfidenceConfig, EvaluationConfig, TrainingConfig
from gpl_platform.data.policies import held_out_of_training
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.candidate_metrics import (
    METRICS,
    candidate_set_metrics,
    item_exposure_segments,
    long_tail_items,
    validation_metrics,
)
from gpl_platform.evaluation.ceiling import load_oracle, pseudo_label_ceiling
from gpl_platform.evaluation.exploration import slice_against_oracle
from gpl_platform.evaluation.method_runs import (
    MethodConfig,
    TrainingData,
    gated_pseudo_labels,
    item_categories,
    train_methods,
    with_confidence,
    with_propensity,
)
from gpl_platform.evaluation.prerankers import PreRankerSpec, preranker_specs
from gpl_platform.evaluation.scores import method_comparisons, test_scores_frame
from gpl_platform.prerank import methods as registry
from gpl_platform.prerank.data import (
    TimeSplit,
    attach_features,
    id_vocabularies,
    load_candidates,
    pseudo_label_lineage,
    time_split,
)
from gpl_platform.prerank.model import ModelConfig
from gpl_platform.quality.gate import failing_label_days

log = logging.getLogger(__name__)


def _with_oracle(frame: pd.DataFrame, warehouse: Warehouse, days: Sequence[date], what: str) -> pd.DataFrame:
    out = frame.merge(load_oracle(warehouse, days), on=["request_id", "item_id"], how="left")
    if out["oracle_label"].isna().any():
        raise ValueError(
            f"{int(out['oracle_label'].isna().sum())} {what} candidates have no oracle label: "
            "offline evaluation needs a benchmark source"
        )
    return out


def _item_vectors(warehouse: Warehouse) -> dict:
    from gpl_platform.pseudo_labels.vectors import read_vectors

    with warehouse.connect(read_only=True) as con:
        meta, vectors = read_vectors(con, "SELECT item_id, vector FROM item_embeddings")
    return dict(zip(meta["item_id"], vectors))


@dataclass
class _Shared:
    """What every pre-ranker and method of one evaluation share."""

    split: TimeSplit
    cands: pd.DataFrame
    in_train: np.ndarray
    in_valid: np.ndarray
    in_test: np.ndarray
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    pseudo: dict[str, pd.DataFrame]
    refused: dict[str, list[str]]
    longtail: set[str]
    item_vectors: dict
    user_vocab: list[str]
    item_vocab: list[str]
    item_categories: pd.Series | None = None


def run_offline_evaluation(
    warehouse: Warehouse,
    store,
    cfg: TrainingConfig,
    dataset: str,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    label_gate=None,
    evaluation: EvaluationConfig | None = None,
    progress: bool = True,
    confidence: ConfidenceConfig | None = None,
    feature_cache: dict | None = None,
    method_configs: dict[str, MethodConfig] | None = None,
    selection: bool = False,
) -> dict:
    """Train every method with every pre-ranker under every seed; return the report (JSON-able but for
    ``_details``): per pre-ranker the metrics of each method, and the pseudo-label ceiling.

    ``method_configs``: a method's own settings (a tuned configuration), else ``cfg``. ``selection``: a run that
    chooses settings: the test days are not loaded at all, only validation metrics are reported.

    ``confidence``: recompute every pseudo-label's weight from its stored factors with these exponents
    (to compare confidence settings without re-materializing the labels). ``feature_cache``: a dict
    kept across calls on the same warehouse and split, so point-in-time features (and the split's inputs, per
    set of methods) are retrieved once."""
    evaluation = evaluation or EvaluationConfig()
    methods = list(methods if methods is not None else evaluation.methods)
    for name in methods:
        registry.method(name)  # an unknown name fails here, with the known ones
    seeds = list(seeds if seeds is not None else cfg.seeds)
    specs = preranker_specs(cfg, evaluation)
    began = time.perf_counter()
    matrices: dict = feature_cache if feature_cache is not None else {}
    # the split's candidates, labels and pseudo-labels are read once per cache too (a tuning run's trials of
    # one method share them); the confidence exponents apply to this call's copy only
    inputs_key = ("inputs", not selection, tuple(sorted(methods)))
    if inputs_key not in matrices:
        matrices[inputs_key] = _shared_inputs(warehouse, cfg, methods, label_gate, evaluation, with_test=not selection)
    shared = dataclasses.replace(matrices[inputs_key])
    shared.pseudo = with_confidence(shared.pseudo, confidence)
    for service in dict.fromkeys(spec.service for spec in specs):
        if service not in matrices:
            log.info("retrieving point-in-time features (%s) for %d candidates", service, len(shared.cands))
            matrices[service] = attach_features(store, shared.cands, service)

    results, exposed_only_models = {}, {}
    total = len(specs) * len(seeds) * len(methods)
    # one step per trained model (pre-rankers x seeds x methods); the postfix names the model in training
    with tqdm(total=total, desc="offline evaluation", unit="model", disable=not progress) as bar:
        for spec in specs:
            matrix, columns = matrices[spec.service]
            results[spec.name], exposed_only_models[spec.name] = _evaluate_preranker(
                spec, matrix, columns, shared, cfg, methods, seeds, bar, method_configs or {}
            )
    headline = specs[0].name
    pseudo_main = shared.pseudo.get("main", pd.DataFrame()).merge(
        load_oracle(warehouse, shared.split.train_days), on=["request_id", "item_id"]
    )
    report = {
        "dataset": dataset,
        "seeds": seeds,
        "preranker": headline,
        "methods": results[headline]["methods"],
        "runs": results[headline]["runs"],
        "prerankers": {
            name: {
                "methods": r["methods"],
                "runs": r["runs"],
                "skipped_methods": r["skipped_methods"],
                "ips_propensity": r["ips_propensity"],
            }
            for name, r in results.items()
        },
        "skipped_methods": results[headline]["skipped_methods"],
        "method_families": {m: registry.method(m).family for m in methods},
        "split": shared.split.describe(),
        "n_test_requests": int(shared.test["request_id"].nunique()),
        "n_test_candidates": int(len(shared.test)),
        "n_train_candidates": int(len(shared.train)),
        "test_candidates_by_item_exposure": {k: int(v) for k, v in shared.test["item_segment"].value_counts().items()},
        "feature_service": cfg.feature_service,
        "training_config": cfg.model_dump(),
        "evaluation_config": evaluation.model_dump(),
        "pseudo_label_lineage": pseudo_label_lineage(warehouse, shared.split.train_days),
        "long_tail_items": len(shared.longtail),
        "pseudo_label_days_refused_by_quality_gate": {k: len(v) for k, v in shared.refused.items()},
        "pseudo_label_days": pseudo_label_day_status(warehouse, shared, label_gate),
        "pseudo_label_days_in_training_window": len(shared.split.train_days),
        "_details": {"pseudo_main": pseudo_main[["pseudo_label", "confidence", "oracle_label"]]},
    }
    report["selection"] = selection
    report["method_configs"] = {
        m: {"training": c.training.model_dump(), "confidence": c.confidence and c.confidence.model_dump()}
        for m, c in (method_configs or {}).items()
    }
    report["_details"]["test"] = shared.test
    report["_details"]["scores"] = {name: r.pop("_scores") for name, r in results.items()}
    scores = report["_details"]["scores_frame"] = test_scores_frame(report)
    if scores is not None:
        for name in results:
            report["prerankers"][name]["comparisons"] = method_comparisons({0: scores}, name)
        report["comparisons"] = report["prerankers"][headline]["comparisons"]
    if not selection and len(shared.test):
        check = slice_against_oracle(
            shared.test,
            shared.test["oracle_label"].to_numpy(int),
            report["_details"]["scores"][headline],
            evaluation,
            report["method_families"],
            cfg.ips_clip,
        )
        if check:
            report["exploration"] = check
    if "exposed_only" in methods and not selection:
        report["ceiling"] = pseudo_label_ceiling(warehouse, shared, exposed_only_models, matrices, evaluation)
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def pseudo_label_day_status(warehouse: Warehouse, shared: _Shared, label_gate) -> dict:
    """How many days of the main pseudo-labels carry labels, have none (no calibration yet, no history,
    or a calibration without ranking: labelling says which in its metadata) or fail the blocking gate;
    over the training window and over the whole timeline."""
    split = shared.split
    all_days = split.train_days + split.valid_days + split.test_days
    failing = failing_label_days(warehouse, all_days, label_gate)
    per_day = warehouse.query(
        "SELECT day, count(*) AS n FROM pseudo_labels WHERE day BETWEEN ? AND ? GROUP BY day",
        [min(all_days), max(all_days)],
    )
    labelled = {d for d, n in zip(pd.to_datetime(per_day["day"]).dt.date, per_day["n"]) if n > 0}

    def status(days: list) -> dict:
        refused = sum(d in failing for d in days)
        with_labels = sum(d in labelled and d not in failing for d in days)
        return {
            "days": len(days),
            "with_labels": with_labels,
            "refused_by_gate": refused,
            "without_labels": len(days) - with_labels - refused,
            "refused_share": round(refused / len(days), 4) if days else 0.0,
        }

    return {"training_window": status(split.train_days), "timeline": status(all_days)}


def _shared_inputs(
    warehouse: Warehouse,
    cfg: TrainingConfig,
    methods: Sequence[str],
    label_gate,
    evaluation: EvaluationConfig,
    with_test: bool = True,
) -> _Shared:
    split = time_split(warehouse, cfg.test_share, cfg.valid_share)
    # a selection run never reads the test days' candidates or labels
    days = split.train_days + split.valid_days + (split.test_days if with_test else [])
    cands = load_candidates(warehouse, days)
    trains = ~cands["logging_policy"].isin(set(held_out_of_training(evaluation))).to_numpy()  # the slice: test only
    in_train = cands["day"].isin(set(split.train_days)).to_numpy() & trains
    in_valid = cands["day"].isin(set(split.valid_days)).to_numpy() & trains
    in_test = cands["day"].isin(set(split.test_days)).to_numpy()
    train = cands[in_train].reset_index(drop=True)
    exposures = train[train["exposed"]].groupby("item_id").size()
    test = (
        _with_oracle(cands[in_test].reset_index(drop=True), warehouse, split.test_days, "test")
        if with_test
        else cands.iloc[0:0].assign(oracle_label=pd.Series(dtype="Int8"))
    )
    test["item_segment"] = item_exposure_segments(test["item_id"], exposures, evaluation.rare_exposures_max)
    valid = _with_oracle(cands[in_valid].reset_index(drop=True), warehouse, split.valid_days, "validation")
    pseudo, refused = gated_pseudo_labels(warehouse, split.train_days, split.valid_days, methods, label_gate)
    user_vocab, item_vocab = id_vocabularies(warehouse)  # used by the id-embedding pre-ranker shapes
    categories = item_categories(warehouse) if any(registry.method(m).teacher for m in methods) else None
    return _Shared(
        split,
        cands,
        in_train,
        in_valid,
        in_test,
        train,
        valid,
        test,
        pseudo,
        refused,
        long_tail_items(train),
        _item_vectors(warehouse),
        user_vocab,
        item_vocab,
        categories,
    )


def _evaluate_preranker(
    spec: PreRankerSpec,
    matrix: np.ndarray,
    columns: list[str],
    shared: _Shared,
    cfg: TrainingConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    bar,
    method_configs: dict[str, MethodConfig],
) -> tuple[dict, object]:
    """Every method under every seed with one pre-ranker; the seed-0 exposed_only model for the ceiling."""
    train_days = set(shared.split.train_days)
    data = TrainingData(
        train=shared.train,
        train_x=matrix[shared.in_train],
        columns=columns,
        valid=shared.valid.drop(columns=["oracle_label"]),  # training stops on exposed clicks, never the oracle
        valid_x=matrix[shared.in_valid],
        pseudo={name: frame[frame["day"].isin(train_days)] for name, frame in shared.pseudo.items()},
        cfg=cfg,
        model_config=ModelConfig(shape=spec.shape, id_dim=cfg.id_embedding_dim),
        user_vocab=shared.user_vocab,
        item_vocab=shared.item_vocab,
    )
    data = with_propensity(data, methods)
    data.item_categories = shared.item_categories
    test_x = matrix[shared.in_test]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    skipped: dict[str, str] = {}
    scores_of: dict[tuple[str, int], np.ndarray] = {}  # test scores of every run: uncertainty, oracle-free checks
    exposed_only_model = None
    for seed in seeds:
        for method, model, history in train_methods(data, methods, seed, skipped, shared.refused, method_configs):
            bar.set_postfix_str(f"{spec.shape} seed {seed} {method}", refresh=True)
            valid_scores = model.predict(
                data.valid_x, shared.valid["user_id"].to_numpy(), shared.valid["item_id"].to_numpy()
            )
            metrics = validation_metrics(shared.valid, valid_scores)
            if len(shared.test):
                scores = model.predict(test_x, shared.test["user_id"].to_numpy(), shared.test["item_id"].to_numpy())
                scores_of[(method, seed)] = scores
                metrics |= candidate_set_metrics(shared.test, scores, shared.longtail, shared.item_vectors)
            runs[method].append({"seed": seed, **metrics, "train": run_record(history)})
            if method == "exposed_only" and exposed_only_model is None:
                exposed_only_model = model
            log.info(
                "%s seed %d %-20s unexposed_gauc %.4f valid_unexposed_gauc %.4f (%d rows, %.1fs)",
                spec.name,
                seed,
                method,
                metrics.get("unexposed_gauc", float("nan")),
                metrics["valid_unexposed_gauc"],
                history["n_rows"],
                history["seconds"],
            )
            bar.update(1)
        bar.update(sum(1 for m in methods if m in skipped))  # a skipped method's models are not trained
    runs = {m: rs for m, rs in runs.items() if rs}
    summary = {
        m: {
            k: {"mean": float(np.nanmean([r[k] for r in rs])), "std": float(np.nanstd([r[k] for r in rs]))}
            for k in METRICS
            if k in rs[0]
        }
        for m, rs in runs.items()
    }
    return {
        "_scores": scores_of,
        "methods": summary,
        "runs": runs,
        "skipped_methods": skipped,
        "ips_propensity": data.propensity_kind,
    }, exposed_only_model


#: what every run records of its training (the budget: steps and epochs run, where the best model was, whether
#: training stopped at the step cap instead of by early stopping)
RUN_RECORD = (
    "steps",
    "epochs_run",
    "best_step",
    "best_epoch",
    "hit_cap",
    "best_valid_auc",
    "n_rows",
    "n_pseudo",
    "seconds",
)


def run_record(history: dict) -> dict:
    return {k: history[k] for k in RUN_RECORD if k in history}
