"""The bias sweep: the settings grid, and what its JSON, plot and results table are made of.

``bench/bench_bias_sweep.py`` (``gpl bench bias-sweep``) runs each setting through the asset
graph and the offline evaluation; this module holds the grid (docs/EVALUATION.md, "The settings
of the bias sweep") and turns the per-setting evaluation reports into the sweep's JSON
``{"source", "settings": {name: {"protocol", "methods", "comparisons", "prerankers", "ceiling"}}}``, the lift
plot and the markdown table. The headline is the pre-ranker's own metric, per-request GAUC on unexposed
candidates, as paired differences with 95% intervals (:mod:`gpl_platform.evaluation.uncertainty`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from gpl_platform.evaluation.uncertainty import helps
from gpl_platform.prerank import methods as registry

# Every setting names all its protocol values, so that the grid does not move when a default does.
_FIRST_ML = {
    "labels": "explicit",
    "recall_cooccurrence_share": 0.0,
    "exposure_share": 0.30,
    "exposure": {"policy": "popularity"},
}
_REALISTIC_ML = {"labels": "explicit", "recall_cooccurrence_share": 0.5, "exposure": {"policy": "logging"}}
_FIRST_SIM = {"exposure_share": 0.25, "exposure": {"policy": "popularity"}}
# The semantic-ID generator's 30-day refit grid never has a model inside the simulator's two-week world
# (every day would fall back to history anchors): there it is refitted every 3 days.
_SIM_SID = {"sid": {"generator": {"retrain_every_days": 3}}}

#: {source: {setting: Settings overrides}}: fixed before the deciding run (docs/EVALUATION.md)
SWEEP_SETTINGS: dict[str, dict[str, dict]] = {
    "movielens-100k": {
        "popularity_30": {"movielens": _FIRST_ML},
        "logging_10": {"movielens": {**_REALISTIC_ML, "exposure_share": 0.10}},
        "logging_5": {"movielens": {**_REALISTIC_ML, "exposure_share": 0.05}},
        "implicit_logging_10": {"movielens": {**_REALISTIC_ML, "labels": "implicit", "exposure_share": 0.10}},
        "implicit_logging_5": {"movielens": {**_REALISTIC_ML, "labels": "implicit", "exposure_share": 0.05}},
    },
    "simulator": {
        "popularity_25": {"simulator": _FIRST_SIM, **_SIM_SID},
        "logging_10": {"simulator": {"exposure_share": 0.10, "exposure": {"policy": "logging"}}, **_SIM_SID},
        "logging_5": {"simulator": {"exposure_share": 0.05, "exposure": {"policy": "logging"}}, **_SIM_SID},
        "self_selection_10": {
            "simulator": {"exposure_share": 0.10, "exposure": {"policy": "self_selection"}},
            **_SIM_SID,
        },
        # follow-up settings (docs/EVALUATION.md): the recall half learns from earlier days' logged clicks
        "logging_10_logged_recall": {
            "simulator": {"exposure_share": 0.10, "exposure": {"policy": "logging"}, "recall": "logged_clicks"},
            **_SIM_SID,
        },
        "logging_5_logged_recall": {
            "simulator": {"exposure_share": 0.05, "exposure": {"policy": "logging"}, "recall": "logged_clicks"},
            **_SIM_SID,
        },
    },
}
#: the realistic reference setting of each source, where defaults are chosen
REFERENCE_SETTING = {"movielens-100k": "logging_10", "simulator": "logging_10"}
#: every baseline and control of the registry, gpl and its two anchor ablations (docs/EVALUATION.md)
SWEEP_METHODS = (
    *registry.names("baseline"),
    "gpl",
    *registry.names("control"),
    "gpl_history_anchors",
    "gpl_sid",
)
#: baselines and controls when a report does not name its methods' families (``method_families``)
BASELINES = registry.names("baseline")
CONTROLS = registry.names("control")
#: the metric whose lift the plot shows, and what it is plotted against
LIFT_METRIC = "unexposed_auc"
#: the results table's headline: the pre-ranker's own job, ordering each request's unexposed candidates
HEADLINE_METRIC = "unexposed_gauc"


def setting_overrides(source: str, setting: str, data_dir: Path, extra: dict | None = None) -> dict:
    """Settings overrides of one setting of the grid, with its own data directory."""
    try:
        base = SWEEP_SETTINGS[source][setting]
    except KeyError:
        known = ", ".join(SWEEP_SETTINGS.get(source, {})) or "none"
        raise ValueError(f"unknown setting {setting!r} for source {source!r} (known: {known})") from None
    overrides = deep_merge(copy.deepcopy(base), extra or {})
    overrides.update(source=source, data_dir=str(data_dir))
    return overrides


def deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def pooled_std(a: dict, b: dict) -> float:
    """sqrt((s_a^2 + s_b^2) / 2) of two {"mean", "std"} entries."""
    return math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def gpl_lift(methods: dict, metric: str = LIFT_METRIC, method: str = "gpl", baseline: str = "exposed_only") -> dict:
    """GPL's lift over a baseline on one metric: difference of means, pooled std and their ratio."""
    if metric not in methods.get(method, {}) or metric not in methods.get(baseline, {}):
        return {}
    a, b = methods[method][metric], methods[baseline][metric]
    spread = pooled_std(a, b)
    lift = a["mean"] - b["mean"]
    return {"lift": lift, "pooled_std": spread, "lift_in_pooled_std": lift / spread if spread > 0 else float("nan")}


def summarize_setting(
    report: dict,
    protocol: dict,
    comparisons: list[dict] | dict[str, list[dict]] | None = None,
    worlds: int | list | None = None,
) -> dict:
    """One setting's entry of the sweep JSON, from its evaluation report.

    ``comparisons`` (default: the report's ``comparisons``, per pre-ranker its ``prerankers.<name>.comparisons``):
    the list of :func:`gpl_platform.evaluation.uncertainty.comparisons` of the headline pre-ranker, or
    ``{pre-ranker: list}``. ``worlds`` (default: the report's ``worlds``): how many simulator worlds (or
    their list) the setting's numbers pool; recorded as ``protocol["worlds"]``."""
    shapes = report.get("prerankers") or {report.get("preranker", "mlp"): {"methods": report["methods"]}}
    default = report.get("preranker", next(iter(shapes)))
    if comparisons is None or isinstance(comparisons, list):
        listed = comparisons if comparisons is not None else report.get("comparisons")
        by_shape = {shape: entry.get("comparisons") for shape, entry in shapes.items()}
        if listed is not None:
            by_shape[default] = listed
    else:
        by_shape = dict(comparisons)
    worlds = worlds if worlds is not None else report.get("worlds")
    protocol = dict(protocol)
    if worlds is not None:
        protocol["worlds"] = len(worlds) if isinstance(worlds, list | tuple) else int(worlds)
    families = report.get("method_families") or {}
    summary = {
        "protocol": protocol,
        "methods": shapes[default]["methods"],
        "comparisons": [dict(c) for c in by_shape.get(default) or []],
        "preranker": default,
        "prerankers": {
            shape: {
                "methods": entry["methods"],
                "comparisons": [dict(c) for c in by_shape.get(shape) or []],
                "gpl_helps": gpl_helps(entry["methods"], by_shape.get(shape) or [], families),
                "gpl_lift": {m: gpl_lift(entry["methods"], m) for m in ("unexposed_auc", "unexposed_hr@10", "auc")},
                "train_serving_gap": train_serving_gap(entry["methods"]),
                **training_budget(entry.get("runs") or {}),
            }
            for shape, entry in shapes.items()
        },
        "ceiling": report.get("ceiling", {}),
        "pseudo_label_days": report.get("pseudo_label_days", {}),
        "split": report.get("split"),
        "seeds": report.get("seeds"),
        "seconds": report.get("seconds"),
    }
    if families:
        summary["method_families"] = families
    return summary


def combine_worlds(reports: dict) -> dict:
    """One setting's evaluation reports of several worlds as one: every run tagged with its world, each method's
    mean and std over all (world, seed) runs, the first world's other fields."""
    first = next(iter(reports.values()))
    combined = {k: v for k, v in first.items() if k not in ("methods", "runs", "prerankers")}
    combined["worlds"] = list(reports)
    combined["prerankers"] = {}
    for shape in first.get("prerankers", {}):
        runs: dict[str, list[dict]] = {}
        for world, report in reports.items():
            for method, entries in report["prerankers"][shape]["runs"].items():
                runs.setdefault(method, []).extend({"world": world, **e} for e in entries)
        metrics = [k for k, v in next(iter(runs.values()))[0].items() if isinstance(v, float)]
        summary = {
            m: {
                k: {
                    "mean": float(np.nanmean([e.get(k, np.nan) for e in rs])),
                    "std": float(np.nanstd([e.get(k, np.nan) for e in rs])),
                }
                for k in metrics
            }
            for m, rs in runs.items()
        }
        combined["prerankers"][shape] = {"methods": summary, "runs": runs}
    headline = first.get("preranker", next(iter(combined["prerankers"]), None))
    if headline in combined["prerankers"]:
        combined["methods"] = combined["prerankers"][headline]["methods"]
        combined["runs"] = combined["prerankers"][headline]["runs"]
    return combined


#: what the sweep keeps of each run's training: the budget it used and whether it ended at the step cap
RUN_BUDGET_KEYS = ("steps", "epochs_run", "best_step", "best_epoch", "hit_cap")


def training_budget(runs: dict) -> dict:
    """Per method, each run's world, seed and training budget (steps, epochs run, best epoch, whether it hit
    the cap), and how many runs ended at the cap (the protocol's goal: none)."""
    kept = {
        method: [
            {k: r[k] for k in ("world", "seed") if k in r} | {k: (r.get("train") or {}).get(k) for k in RUN_BUDGET_KEYS}
            for r in entries
        ]
        for method, entries in runs.items()
    }
    at_cap = sum(bool(r["hit_cap"]) for entries in kept.values() for r in entries)
    return {"runs": kept, "runs_at_cap": at_cap}


def family_members(family: str, families: dict | None = None) -> tuple[str, ...]:
    """The methods of a family ("baseline", "control") as the report names them, else the defaults here."""
    if families:
        return tuple(m for m, f in families.items() if f == family)
    return {"baseline": BASELINES, "control": CONTROLS}.get(family, ())


def best_method(methods: dict, candidates, metric: str) -> str | None:
    """The candidate with the highest mean of ``metric`` (the best tuned one), None if none has it."""
    scored = [
        m
        for m in candidates
        if m in methods and metric in methods[m] and np.isfinite(methods[m][metric].get("mean") or np.nan)
    ]
    return max(scored, key=lambda m: methods[m][metric]["mean"], default=None)


def find_comparison(comparisons: list[dict], against: str | None, metric: str, method: str = "gpl") -> dict | None:
    for entry in comparisons or []:
        if (entry["method"], entry["against"], entry["metric"]) == (method, against, metric):
            return entry
    return None


def gpl_helps(methods: dict, comparisons: list[dict], families: dict | None = None) -> dict:
    """The claim rule on the headline metric: GPL helps only where its intervals against the best baseline
    and against the best control both lie above 0 (no claim without both comparisons)."""
    best_baseline = best_method(methods, family_members("baseline", families), HEADLINE_METRIC)
    best_control = best_method(methods, family_members("control", families), HEADLINE_METRIC)
    return {
        "metric": HEADLINE_METRIC,
        "best_baseline": best_baseline,
        "best_control": best_control,
        "helps": helps(comparisons, best_baseline, best_control, HEADLINE_METRIC),
    }


def train_serving_gap(methods: dict, method: str = "exposed_only") -> float | None:
    """AUC on exposed minus AUC on unexposed test candidates of ``method``: what exposure alone teaches
    about the part of the serving distribution it never shows."""
    entry = methods.get(method, {})
    if "exposed_auc" not in entry or "unexposed_auc" not in entry:
        return None
    return entry["exposed_auc"]["mean"] - entry["unexposed_auc"]["mean"]
