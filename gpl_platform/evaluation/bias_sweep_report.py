"""The bias sweep's outputs a person reads: the lift table, the lift plot and the markdown section of a
results document (`gpl bench bias-sweep --results-doc`). The sweep's settings and how its worlds combine:
:mod:`gpl_platform.evaluation.bias_sweep`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.evaluation.bias_sweep import (
    HEADLINE_METRIC,
    LIFT_METRIC,
    best_method,
    family_members,
    find_comparison,
)
from gpl_platform.evaluation.report import save_figure
from gpl_platform.evaluation.uncertainty import helps


def lift_table(sweep: dict) -> pd.DataFrame:
    """One row per (setting, pre-ranker): bias statistics; the headline, GPL minus the best baseline and
    minus the best control on unexposed GAUC with 95% intervals and whether GPL helps; and the older
    columns on unexposed AUC (lift over exposed_only in pooled stds over seeds)."""
    rows = []
    for name, entry in sweep["settings"].items():
        protocol = entry["protocol"]
        stats = protocol.get("statistics", {})
        families = entry.get("method_families")
        for shape, result in entry["prerankers"].items():
            methods = result["methods"]
            comparisons = result.get("comparisons") or []
            # the headline decides the best baseline; a report from before it had unexposed GAUC, the old metric
            ranking = HEADLINE_METRIC if best_method(methods, methods, HEADLINE_METRIC) else LIFT_METRIC
            best_baseline = best_method(methods, family_members("baseline", families), ranking)
            best_control = best_method(methods, family_members("control", families), ranking)
            row = {
                "setting": name,
                "preranker": shape,
                "worlds": protocol.get("worlds"),
                "exposure_rate": stats.get("exposure_rate"),
                "never_exposed_items": stats.get("items_never_exposed_share"),
                "train_serving_gap": result.get("train_serving_gap"),
                "best_baseline": best_baseline,
                "best_control": best_control,
            }
            for role, against in (("baseline", best_baseline), ("control", best_control)):
                found = find_comparison(comparisons, against, HEADLINE_METRIC) or {}
                lo, hi = found.get("ci95") or (None, None)
                diff = found.get("diff")
                if diff is None and against and HEADLINE_METRIC in methods.get("gpl", {}):
                    # no per-request results: the difference of means, without an interval
                    diff = methods["gpl"][HEADLINE_METRIC]["mean"] - methods[against][HEADLINE_METRIC]["mean"]
                row[f"gpl_minus_best_{role}_{HEADLINE_METRIC}"] = diff
                row[f"gpl_minus_best_{role}_{HEADLINE_METRIC}_ci95_lo"] = lo
                row[f"gpl_minus_best_{role}_{HEADLINE_METRIC}_ci95_hi"] = hi
            row["gpl_helps"] = helps(comparisons, best_baseline, best_control, HEADLINE_METRIC)
            for metric in ("unexposed_auc", "unexposed_hr@10"):
                lift = result["gpl_lift"].get(metric, {})
                row[f"gpl_lift_{metric}"] = lift.get("lift")
                row[f"gpl_lift_{metric}_in_std"] = lift.get("lift_in_pooled_std")
            if best_baseline and "gpl" in methods and LIFT_METRIC in methods[best_baseline]:
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
    return save_figure(fig, path)


def _fmt(entry: dict | None) -> str:
    if entry and entry.get("mean") is None and entry.get("note"):
        # a segment too small to compare methods on: its size and why there is no number
        return f"n/a ({entry['note']}, n={entry.get('n')})"
    if not entry or entry.get("mean") is None or not np.isfinite(entry["mean"]):
        return "n/a"
    text = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
    return f"{text} (n={entry['n']})" if entry.get("n") is not None else text


def _fmt_ci(entry: dict) -> str:
    lo, hi = entry.get("ci95") or (None, None)
    diff = "n/a" if entry.get("diff") is None else f"{entry['diff']:+.4f}"
    return diff if lo is None else f"{diff} [{lo:+.4f}, {hi:+.4f}]"


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
                "worlds": entry["protocol"].get("worlds"),
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
            f"GPL against the best baseline and the best control on `{HEADLINE_METRIC}` (paired difference of "
            "means and its 95% bootstrap interval over worlds, seeds and test requests; `gpl_helps` only where "
            "both intervals lie above 0), then against `exposed_only` on unexposed AUC (lift of the mean; in units "
            "of the pooled std over seeds):",
            "",
            lift.to_markdown(index=False, floatfmt=".4f"),
            "",
        ]
    # the headline first, then its segments as the evaluation names them (e.g. never-exposed, long-tail items)
    segments = [
        k
        for entry in sweep["settings"].values()
        for result in entry["prerankers"].values()
        for values in result["methods"].values()
        for k in values
        if k.endswith("_gauc") and k != HEADLINE_METRIC
    ]
    metrics = (
        HEADLINE_METRIC,
        *dict.fromkeys(segments),
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
            if result.get("comparisons"):
                table = pd.DataFrame(
                    [
                        {"against": c["against"], "metric": c["metric"], "gpl minus it [95% interval]": _fmt_ci(c)}
                        for c in result["comparisons"]
                    ]
                )
                lines += [
                    f"`{name}`, pre-ranker `{shape}`, GPL against every baseline and control "
                    f"({entry['protocol'].get('worlds', 1)} world(s), paired over seeds and test requests):",
                    "",
                    table.to_markdown(index=False),
                    "",
                ]
        ceiling = entry.get("ceiling", {})
        if ceiling.get("rows"):
            lines += [
                f"`{name}`, pseudo-label ceiling (AUC against the oracle on unexposed candidates; "
                "`exposed_only` on the same candidates; `bayes_auc`: the true click probability as the score, "
                "the best any label could do):",
                "",
                pd.DataFrame(ceiling["rows"]).to_markdown(index=False, floatfmt=".4f"),
                "",
            ]
    return "\n".join(lines)
