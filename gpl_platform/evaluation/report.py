"""The readable offline-evaluation report: a markdown table plus plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TABLE_METRICS = ("auc", "gauc", "hr@3", "hr@5", "hr@10", "unexposed_auc", "unexposed_hr@10", "longtail_hr@10",
                 "coverage@10", "diversity@10")
BAR_METRICS = ("auc", "gauc", "hr@10", "unexposed_auc", "longtail_hr@10")


def results_table(report: dict) -> pd.DataFrame:
    rows = []
    for method, metrics in report["methods"].items():
        rows.append({"method": method, **{m: f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}"
                                          for m in TABLE_METRICS if m in metrics}})
    return pd.DataFrame(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(report: dict, path: Path) -> Path:
    plt = _plt()
    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4 * len(BAR_METRICS), 4), sharey=False)
    for ax, metric in zip(axes, BAR_METRICS):
        means = [report["methods"][m][metric]["mean"] for m in methods]
        stds = [report["methods"][m][metric]["std"] for m in methods]
        colors = ["#c44e52" if m.startswith("gpl") else "#4c72b0" if m != "pseudo_only" else "#dd8452"
                  for m in methods]
        ax.barh(methods, means, xerr=stds, color=colors)
        finite = [v for v in means if np.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_xlim(max(0, lo - (hi - lo) * 0.6 - 0.01), hi + (hi - lo) * 0.3 + 0.01)
        ax.set_title(metric)
        ax.invert_yaxis()
    fig.suptitle(f"{report['dataset']}: test metrics, mean ± std over seeds {report['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_calibration(pseudo: pd.DataFrame, path: Path, bins: int = 10) -> Path:
    """Pseudo-label vs the oracle positive rate of the same (unexposed, training-day) candidates."""
    plt = _plt()
    frame = pseudo.assign(bin=pd.cut(pseudo["pseudo_label"], np.linspace(0, 1, bins + 1), include_lowest=True))
    table = frame.groupby("bin", observed=True).agg(pred=("pseudo_label", "mean"), real=("oracle_label", "mean"),
                                                    n=("oracle_label", "size"))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot(table["pred"], table["real"], "o-", color="#c44e52")
    for _, r in table.iterrows():
        ax.annotate(str(int(r["n"])), (r["pred"], r["real"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("pseudo-label (calibrated similarity)")
    ax.set_ylabel("oracle positive rate")
    ax.set_title("pseudo-label calibration (unexposed, train days)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_longtail_lift(report: dict, path: Path, baseline: str = "exposed_only") -> Path:
    plt = _plt()
    base = report["methods"][baseline]["longtail_hr@10"]["mean"]
    methods = [m for m in report["methods"] if m != baseline]
    lift = [report["methods"][m]["longtail_hr@10"]["mean"] / base - 1 if base else np.nan for m in methods]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh(methods, lift, color=["#c44e52" if v >= 0 else "#4c72b0" for v in lift])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"long-tail HR@10 relative to {baseline}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_markdown(report: dict, directory: Path, stem: str = "offline_eval") -> Path:
    directory = Path(directory)
    bars = plot_metric_bars(report, directory / f"{stem}_metrics.png")
    lift = plot_longtail_lift(report, directory / f"{stem}_longtail_lift.png")
    lines = [f"# Offline evaluation: {report['dataset']}", "",
             f"Seeds {report['seeds']}; split {report['split']}; {report['n_test_requests']} test requests, "
             f"{report['n_test_candidates']} test candidates; feature service `{report['feature_service']}`; "
             f"lambda {report['training_config']['pseudo_weight']}.", "",
             results_table(report).to_markdown(index=False), "",
             f"![metrics]({bars.name})", "", f"![long-tail lift]({lift.name})", ""]
    pseudo = report.get("_details", {}).get("pseudo_main")
    if pseudo is not None and len(pseudo):
        cal = plot_calibration(pseudo, directory / f"{stem}_calibration.png")
        lines += [f"![calibration]({cal.name})", ""]
    path = directory / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path
