"""The bias sweep: the settings grid, and what its JSON, plot and results table are made of.

``bench/bench_bias_sweep.py`` (``gpl bench bias-sweep``) runs each setting through the asset
graph and the offline evaluation; this module holds the grid (docs/EVALUATION.md, "The settings
of the bias sweep") and turns the per-setting evaluation reports into the sweep's JSON
``{"source", "settings": {name: {"protocol", "methods", "prerankers", "ceiling"}}}``, the lift plot and
the markdown table.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd

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
SWEEP_METHODS = (
    "exposed_only",
    "ips",
    "ranker_distillation",
    "unexposed_negative",
    "gpl",
    "gpl_history_anchors",
    "gpl_sid",
)
BASELINES = ("exposed_only", "ips", "ranker_distillation", "unexposed_negative")
#: the metric whose lift the plot shows, and what it is plotted against
LIFT_METRIC = "unexposed_auc"


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
    if method not in methods or baseline not in methods:
        return {}
    a, b = methods[method][metric], methods[baseline][metric]
    spread = pooled_std(a, b)
    lift = a["mean"] - b["mean"]
    return {"lift": lift, "pooled_std": spread, "lift_in_pooled_std": lift / spread if spread > 0 else float("nan")}


def summarize_setting(report: dict, protocol: dict) -> dict:
    """One setting's entry of the sweep JSON, from its evaluation report."""
    shapes = report.get("prerankers") or {report.get("preranker", "mlp"): {"methods": report["methods"]}}
    default = report.get("preranker", next(iter(shapes)))
    return {
        "protocol": protocol,
        "methods": shapes[default]["methods"],
        "preranker": default,
        "prerankers": {
            shape: {
                "methods": entry["methods"],
                "gpl_lift": {m: gpl_lift(entry["methods"], m) for m in ("unexposed_auc", "unexposed_hr@10", "auc")},
                "train_serving_gap": train_serving_gap(entry["methods"]),
            }
            for shape, entry in shapes.items()
        },
        "ceiling": report.get("ceiling", {}),
        "pseudo_label_days": report.get("pseudo_label_days", {}),
        "split": report.get("split"),
        "seeds": report.get("seeds"),
        "seconds": report.get("seconds"),
    }


def train_serving_gap(methods: dict, method: str = "exposed_only") -> float | None:
    """AUC on exposed minus AUC on unexposed test candidates of ``method``: what exposure alone teaches
    about the part of the serving distribution it never shows."""
    entry = methods.get(method, {})
    if "exposed_auc" not in entry or "unexposed_auc" not in entry:
        return None
    return entry["exposed_auc"]["mean"] - entry["unexposed_auc"]["mean"]


def lift_table(sweep: dict) -> pd.DataFrame:
    """One row per (setting, pre-ranker): bias statistics and GPL's lift over exposed_only."""
    rows = []
    for name, entry in sweep["settings"].items():
        stats = entry["protocol"].get("statistics", {})
        for shape, result in entry["prerankers"].items():
            methods = result["methods"]
            best_baseline = max(
                (m for m in BASELINES if m in methods), key=lambda m: methods[m][LIFT_METRIC]["mean"], default=None
            )
            row = {
                "setting": name,
                "preranker": shape,
                "exposure_rate": stats.get("exposure_rate"),
                "never_exposed_items": stats.get("items_never_exposed_share"),
                "train_serving_gap": result.get("train_serving_gap"),
                "best_baseline": best_baseline,
            }
            for metric in ("unexposed_auc", "unexposed_hr@10"):
                lift = result["gpl_lift"].get(metric, {})
                row[f"gpl_lift_{metric}"] = lift.get("lift")
                row[f"gpl_lift_{metric}_in_std"] = lift.get("lift_in_pooled_std")
            if best_baseline and "gpl" in methods:
                row["gpl_minus_best_baseline_unexposed_auc"] = (
                    methods["gpl"][LIFT_METRIC]["mean"] - methods[best_baseline][LIFT_METRIC]["mean"]
                )
            rows.append(row)
    return pd.DataFrame(rows)


def plot_lift(sweep: dict, path: Path) -> Path:
    """GPL's unexposed-AUC lift over exposed_only (error bar: pooled std) against the train-serving gap
    of exposed_only, one series per pre-ranker shape, points named by setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = lift_table(sweep)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.axhline(0, color="grey", lw=1, ls="--")
    for k, (shape, group) in enumerate(table.groupby("preranker", sort=False)):
        group = group.dropna(subset=["train_serving_gap", "gpl_lift_unexposed_auc"])
        if group.empty:
            continue
        errors = [
            sweep["settings"][s]["prerankers"][shape]["gpl_lift"]["unexposed_auc"]["pooled_std"]
            for s in group["setting"]
        ]
        ax.errorbar(
            group["train_serving_gap"],
            group["gpl_lift_unexposed_auc"],
            yerr=errors,
            fmt="o",
            capsize=3,
            label=shape,
            color=f"C{k}",
        )
        for _, row in group.iterrows():
            ax.annotate(
                row["setting"],
                (row["train_serving_gap"], row["gpl_lift_unexposed_auc"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
                color=f"C{k}",
            )
    ax.set_xlabel("bias strength: exposed_only AUC on exposed minus unexposed test candidates")
    ax.set_ylabel("gpl - exposed_only, unexposed AUC")
    ax.set_title(f"{sweep['source']}: GPL's lift against selection bias (mean over seeds {sweep.get('seeds')})")
    ax.legend(title="pre-ranker", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None or not np.isfinite(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def markdown(sweep: dict, command: str, commit: str, plot: str | None = None) -> str:
    """The sweep as markdown: protocol statistics, per-setting results per pre-ranker, the ceiling."""
    lines = [
        f"Generated by `{command}` at commit `{commit}` ({sweep['source']}, seeds {sweep.get('seeds')}, "
        f"{sweep.get('seconds', 0):.0f} s wall).",
        "",
    ]
    if plot:
        lines += [f"![GPL lift against bias strength]({plot})", ""]
    stats_rows = []
    for name, entry in sweep["settings"].items():
        stats = entry["protocol"].get("statistics", {})
        stats_rows.append(
            {
                "setting": name,
                **{
                    k: stats.get(k)
                    for k in (
                        "exposure_rate",
                        "items_never_exposed_share",
                        "positive_rate_exposed (oracle)",
                        "positive_rate_unexposed (oracle)",
                        "requests",
                        "candidates",
                    )
                },
            }
        )
    lines += ["Protocol statistics:", "", pd.DataFrame(stats_rows).to_markdown(index=False), ""]
    lift = lift_table(sweep)
    if not lift.empty:
        lines += [
            "GPL against `exposed_only` (lift of the mean; in units of the pooled std over seeds):",
            "",
            lift.to_markdown(index=False, floatfmt=".4f"),
            "",
        ]
    metrics = (
        "auc",
        "exposed_auc",
        "unexposed_auc",
        "unexposed_hr@10",
        "never_exposed_auc",
        "rarely_exposed_auc",
        "valid_unexposed_auc",
    )
    for name, entry in sweep["settings"].items():
        for shape, result in entry["prerankers"].items():
            rows = [{"method": m, **{k: _fmt(v.get(k)) for k in metrics}} for m, v in result["methods"].items()]
            lines += [f"`{name}`, pre-ranker `{shape}`:", "", pd.DataFrame(rows).to_markdown(index=False), ""]
        ceiling = entry.get("ceiling", {})
        if ceiling.get("rows"):
            lines += [
                f"`{name}`, pseudo-label ceiling (AUC against the oracle on unexposed candidates; "
                "`exposed_only` on the same candidates):",
                "",
                pd.DataFrame(ceiling["rows"]).to_markdown(index=False, floatfmt=".4f"),
                "",
            ]
    return "\n".join(lines)
