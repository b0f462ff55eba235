"""Every method tuned by one rule, with one search budget, on validation days only (docs/EVALUATION.md,
"Tuning").

The rule, fixed before any deciding run: each tuned method gets the same number of trials
(:data:`TRIALS`). A trial is one configuration of the method's search space: the shared knobs (learning rate,
weight decay) and the method's own (its sample rate, clip, distillation weight, or GPL's lambda, pooling and
confidence exponents), drawn without replacement from the grid by a generator seeded with the method's name,
the method's current defaults always being trial 0. Each trial trains the method under every seed in a
selection run, which never loads the test days; the configuration with the best mean
``valid_unexposed_gauc`` (per-request GAUC of the unexposed validation candidates) wins, ties going to the
earlier trial. The controls and GPL's ablations are not tuned: they take GPL's chosen configuration, so that
they keep its rows and weights.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence

import numpy as np

from gpl_platform.config import ConfidenceConfig, EvaluationConfig, TrainingConfig
from gpl_platform.evaluation.method_runs import MethodConfig
from gpl_platform.prerank import methods as registry

log = logging.getLogger(__name__)

#: trials per tuned method: the same search budget for everyone
TRIALS = 8
#: what the selection maximizes (mean over seeds)
SELECTION_METRIC = "valid_unexposed_gauc"
SHARED_SPACE: dict[str, list] = {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 1e-5, 1e-4]}
#: each tuned method's own knobs; "confidence" holds (alpha, beta, gamma) exponents of the stored factors
METHOD_SPACE: dict[str, dict[str, list]] = {
    "exposed_only": {},
    "unexposed_negative": {"negative_sample_rate": [0.05, 0.1, 0.3, 0.6, 1.0]},
    "ips": {"ips_clip": [5.0, 10.0, 20.0, 50.0, 100.0]},
    "ranker_distillation": {"distill_weight": [0.1, 0.3, 1.0]},
    "ukd": {"distill_weight": [0.1, 0.3, 1.0]},
    "gpl": {
        "pseudo_weight": [0.1, 0.3, 1.0],
        "pseudo_label_pooling": ["mean", "max"],
        "confidence": [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (2.0, 1.0, 0.5)],
    },
}


def tuned_methods(names: Sequence[str]) -> list[str]:
    """The methods of ``names`` that get their own search (baselines and gpl); the rest follow gpl."""
    return [n for n in names if n in METHOD_SPACE]


def trials(name: str, cfg: TrainingConfig, confidence: ConfidenceConfig, n: int = TRIALS) -> list[MethodConfig]:
    """The method's ``n`` configurations: its current settings first, then draws from its grid."""
    space = {**SHARED_SPACE, **METHOD_SPACE[name]}
    keys = list(space)
    grid = list(itertools.product(*(space[k] for k in keys)))
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(len(grid))
    chosen = [MethodConfig(cfg, confidence)]
    for index in order:
        if len(chosen) >= n:
            break
        config = _config(dict(zip(keys, grid[index])), cfg, confidence)
        if config not in chosen:
            chosen.append(config)
    return chosen


def _config(values: dict, cfg: TrainingConfig, confidence: ConfidenceConfig) -> MethodConfig:
    exponents = values.pop("confidence", None)
    if exponents is not None:
        alpha, beta, gamma = exponents
        confidence = confidence.model_copy(update={"alpha": alpha, "beta": beta, "gamma": gamma})
    return MethodConfig(cfg.model_copy(update=values), confidence)


def describe(config: MethodConfig) -> dict:
    """The knobs of a configuration that the search varies, for reports."""
    knobs = {
        k: getattr(config.training, k)
        for k in {*SHARED_SPACE, *itertools.chain(*METHOD_SPACE.values())}
        if k != "confidence"
    }
    if config.confidence is not None:
        knobs["confidence"] = [config.confidence.alpha, config.confidence.beta, config.confidence.gamma]
    return dict(sorted(knobs.items()))


def select(
    evaluate,
    names: Sequence[str],
    cfg: TrainingConfig,
    confidence: ConfidenceConfig,
    n: int = TRIALS,
) -> dict:
    """Choose every method's configuration by the rule of this module. ``evaluate(method, config)`` runs a
    selection evaluation (no test days) of one method under one configuration and returns its report.
    Returns ``{"configs": {method: MethodConfig}, "trials": {method: [{"config", "score", "per_seed"}]},
    "rule": ...}``; methods not tuned here take gpl's configuration (or the defaults without gpl)."""
    chosen: dict[str, MethodConfig] = {}
    record: dict[str, list[dict]] = {}
    for name in tuned_methods(names):
        rows = []
        for config in trials(name, cfg, confidence, n):
            report = evaluate(name, config)
            runs = (report.get("runs") or {}).get(name, [])
            per_seed = [r.get(SELECTION_METRIC, float("nan")) for r in runs]
            score = float(np.nanmean(per_seed)) if runs and np.isfinite(per_seed).any() else float("-inf")
            rows.append({"config": describe(config), "score": score, "per_seed": per_seed, "_config": config})
            log.info("tuning %s: %s -> %s %.4f", name, describe(config), SELECTION_METRIC, score)
        best = max(range(len(rows)), key=lambda k: (rows[k]["score"], -k))
        chosen[name] = rows[best]["_config"]
        record[name] = [
            {k: v for k, v in row.items() if k != "_config"} | {"chosen": k == best} for k, row in enumerate(rows)
        ]
    follow = chosen.get("gpl", MethodConfig(cfg, confidence))
    for name in names:
        if name not in chosen and registry.method(name).family in ("gpl", "ablation", "control"):
            chosen[name] = follow
    return {
        "configs": chosen,
        "trials": record,
        "rule": {
            "trials_per_method": n,
            "metric": SELECTION_METRIC,
            "aggregate": "mean over seeds",
            "days": "validation only (the test days are not loaded)",
        },
    }


def selection_evaluator(warehouse, store, cfg: TrainingConfig, evaluation: EvaluationConfig, seeds, label_gate):
    """``evaluate(method, config)`` for :func:`select`: a selection run of the offline evaluation, its
    point-in-time features retrieved once for all trials."""
    from gpl_platform.evaluation.offline import run_offline_evaluation

    cache: dict = {}

    def evaluate(name: str, config: MethodConfig) -> dict:
        return run_offline_evaluation(
            warehouse,
            store,
            cfg,
            "selection",
            methods=[name],
            seeds=seeds,
            label_gate=label_gate,
            evaluation=evaluation,
            progress=False,
            feature_cache=cache,
            method_configs={name: config},
            selection=True,
        )

    return evaluate


def evaluate_with_oracle(warehouse, store, settings, label_gate, progress: bool = True) -> dict:
    """The offline evaluation of ``settings``: with ``evaluation.tune``, every method first tuned by the rule of
    this module (its trials and choices go into the report's ``tuning``), else every method on the settings."""
    from gpl_platform.evaluation.offline import run_offline_evaluation

    cfg, evaluation = settings.training, settings.evaluation
    tuning: dict = {"tuned": False}
    configs = None
    if evaluation.tune:
        evaluate = selection_evaluator(warehouse, store, cfg, evaluation, cfg.seeds, label_gate)
        chosen = select(evaluate, evaluation.methods, cfg, settings.confidence, evaluation.tuning_trials)
        configs = chosen["configs"]
        tuning = {
            "tuned": True,
            "rule": chosen["rule"],
            "trials": chosen["trials"],
            "chosen": {m: describe(c) for m, c in configs.items()},
        }
    report = run_offline_evaluation(
        warehouse,
        store,
        cfg,
        settings.source,
        label_gate=label_gate,
        evaluation=evaluation,
        progress=progress,
        method_configs=configs,
    )
    report["tuning"] = tuning
    return report
