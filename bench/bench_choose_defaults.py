"""Apply the decision rules of docs/EVALUATION.md to a source's reference setting, on validation days only.

    gpl bench choose-defaults --source movielens-100k --selection reports/selection/movielens_logging_10.json \
        --out reports/selection/defaults_movielens.json

``--selection`` is a bias sweep of the reference setting (its warehouse is reused from
``data/bias_sweep/<source>/<setting>``):
1. anchor backend and pooling: the highest pseudo-label AUC on the validation days' labelled
   unexposed candidates (the sweep's ceiling rows); within 0.005, the cheaper backend;
2. pre-ranker shape: the highest mean validation AUC (all validation candidates) of GPL trained on
   those anchors (lambda 1, default confidence); within one pooled std, the lighter shape;
3. lambda x confidence exponents: the highest mean validation unexposed AUC of GPL with that shape;
   within one pooled std, the pair closest to the current default.
No test-day number is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpl.choose_defaults")
BACKEND_COST = {"history": 0, "sid": 1, "smollm": 2, "openai": 3}
SHAPE_COST = {"two_tower:prerank_scalar_v2": 0, "cold:prerank_scalar_v2": 1, "mlp:prerank_v2": 2}
METHOD_OF_VARIANT = {"main": "gpl", "history": "gpl_history_anchors", "sid": "gpl_sid"}
LAMBDAS = (0.1, 0.3, 1.0, 3.0)
CONFIDENCE = {"default": None, "none": {"alpha": 0.0, "beta": 0.0, "gamma": 0.0}}
ANCHOR_TIE = 0.005


def choose_anchors(sweep: dict, setting: str) -> dict:
    """Rule 1, from the ceiling rows of the selection sweep (validation window, all candidates)."""
    entry = sweep["settings"][setting]
    main_backend = entry["protocol"]["overrides"].get("anchors", {}).get("backend", "smollm")
    backend_of = {"main": main_backend, "history": "history", "sid": "sid"}
    options = []
    for row in entry["ceiling"]["rows"]:
        if row["window"] != "valid" or row["segment"] != "all":
            continue
        for pooling in ("max", "mean"):
            value = row[f"pseudo_label_auc_{pooling}"]
            if value is not None and math.isfinite(value):
                options.append(
                    {
                        "variant": row["anchors"],
                        "backend": backend_of[row["anchors"]],
                        "pooling": pooling,
                        "valid_pseudo_label_auc": value,
                        "n": row["n"],
                    }
                )
    if not options:
        raise ValueError(f"{setting}: the selection sweep has no validation ceiling rows")
    best = max(o["valid_pseudo_label_auc"] for o in options)
    close = [o for o in options if o["valid_pseudo_label_auc"] >= best - ANCHOR_TIE]
    chosen = min(close, key=lambda o: (BACKEND_COST.get(o["backend"], 9), -o["valid_pseudo_label_auc"]))
    return {"options": options, "best_auc": best, "chosen": chosen}


def _pooled(a: dict, b: dict) -> float:
    return math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def _pick(results: dict, metric: str, cost) -> tuple[str, dict]:
    """The best key by mean ``metric``; among those within one pooled std of it, the lowest ``cost``."""
    best_key = max(results, key=lambda k: results[k][metric]["mean"])
    best = results[best_key][metric]
    close = [k for k in results if results[k][metric]["mean"] >= best["mean"] - _pooled(best, results[k][metric])]
    return min(close, key=lambda k: (cost(k), -results[k][metric]["mean"])), best


def run(
    source: str, selection: Path, out: Path | None = None, setting: str | None = None, data_root: Path | None = None
) -> dict:
    from gpl_platform.config import PROJECT_ROOT, ConfidenceConfig, load_settings
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.evaluation import bias_sweep
    from gpl_platform.evaluation.offline import run_offline_evaluation
    from gpl_platform.features.store import FeastStore
    from gpl_platform.thresholds import quality_config

    began = time.perf_counter()
    setting = setting or bias_sweep.REFERENCE_SETTING[source]
    sweep = json.loads(Path(selection).read_text())
    root = Path(data_root or PROJECT_ROOT / "data" / "bias_sweep" / source).resolve()
    settings = load_settings(bias_sweep.setting_overrides(source, setting, root / setting))
    warehouse, store = Warehouse.for_settings(settings), FeastStore(settings)
    gate = quality_config(settings).pseudo_labels
    features: dict = {}

    anchors = choose_anchors(sweep, setting)
    method = METHOD_OF_VARIANT[anchors["chosen"]["variant"]]
    pooling = anchors["chosen"]["pooling"]
    training = settings.training.model_copy(update={"pseudo_label_pooling": pooling, "pseudo_weight": 1.0})
    evaluation = settings.evaluation.model_copy(update={"prerankers": list(SHAPE_COST), "methods": [method]})
    log.info(
        "rule 1: %s anchors, %s pooling (%s); rule 2: training %s with every shape",
        anchors["chosen"]["backend"],
        pooling,
        method,
        method,
    )
    report = run_offline_evaluation(
        warehouse, store, training, source, label_gate=gate, evaluation=evaluation, feature_cache=features
    )
    shapes = {name: entry["methods"][method] for name, entry in report["prerankers"].items()}
    shape, shape_best = _pick(shapes, "valid_auc", lambda k: SHAPE_COST[k])

    grid = {}
    for conf_name, exponents in CONFIDENCE.items():
        confidence = ConfidenceConfig(**exponents) if exponents else settings.confidence
        for lam in LAMBDAS:
            cfg = training.model_copy(update={"pseudo_weight": lam})
            ev = evaluation.model_copy(update={"prerankers": [shape]})
            result = run_offline_evaluation(
                warehouse,
                store,
                cfg,
                source,
                label_gate=gate,
                evaluation=ev,
                confidence=confidence,
                feature_cache=features,
                progress=False,
            )
            grid[f"lambda={lam}|confidence={conf_name}"] = result["methods"][method]
            log.info(
                "rule 3: lambda %s confidence %s: valid_unexposed_auc %.4f",
                lam,
                conf_name,
                result["methods"][method]["valid_unexposed_auc"]["mean"],
            )

    def distance(key: str) -> float:  # to the current default: lambda 1, default exponents
        lam, conf = key.split("|")
        return abs(math.log(float(lam.split("=")[1]))) + (0 if conf.endswith("default") else 1)

    pair, pair_best = _pick(grid, "valid_unexposed_auc", distance)
    lam, conf = pair.split("|")
    decision = {
        "source": source,
        "setting": setting,
        "selection": str(selection),
        "rule_1_anchors": anchors,
        "rule_2_preranker": {
            "metric": "valid_auc",
            "results": {k: v["valid_auc"] for k, v in shapes.items()},
            "also_valid_unexposed_auc": {k: v["valid_unexposed_auc"] for k, v in shapes.items()},
            "best": shape_best,
            "chosen": shape,
        },
        "rule_3_lambda_confidence": {
            "metric": "valid_unexposed_auc",
            "results": {k: v["valid_unexposed_auc"] for k, v in grid.items()},
            "best": pair_best,
            "chosen": {"lambda": float(lam.split("=")[1]), "confidence": conf.split("=")[1]},
        },
        "defaults": {
            "anchors.backend": anchors["chosen"]["backend"],
            "training.pseudo_label_pooling": pooling,
            "training.preranker": shape.split(":")[0],
            "training.feature_service": shape.split(":")[1],
            "training.pseudo_weight": float(lam.split("=")[1]),
            "confidence": conf.split("=")[1],
        },
        "seeds": report["seeds"],
        "seconds": round(time.perf_counter() - began, 1),
    }
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(decision, indent=2, default=str) + "\n")
        os.replace(tmp, out)
    return decision
