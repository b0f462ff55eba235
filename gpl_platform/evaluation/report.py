"""The readable offline-evaluation report: a markdown table plus plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.evaluation.exploration import SLICE_METRICS, interval_cell
from gpl_platform.evaluation.scores import scores_path


def save_figure(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path`` (90 dpi, its folder created), then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_json(data: dict, path: Path) -> Path:
    """``data`` as indented JSON at ``path``, atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


TABLE_METRICS = (
    "unexposed_gauc",
    "auc",
    "gauc",
    "hr@3",
    "hr@5",
    "hr@10",
    "unexposed_auc",
    "unexposed_hr@10",
    "longtail_hr@10",
    "coverage@10",
    "diversity@10",
)
#: per pre-ranker: where the bias is (exposed vs unexposed, items by exposure history) and the validation days
SEGMENT_METRICS = (
    "exposed_auc",
    "unexposed_auc",
    "never_exposed_auc",
    "rarely_exposed_auc",
    "often_exposed_auc",
    "valid_auc",
    "valid_unexposed_auc",
)
BAR_METRICS = ("unexposed_gauc", "auc", "hr@10", "unexposed_auc", "longtail_hr@10")


def results_table(report: dict, methods: dict | None = None, metrics: tuple[str, ...] = TABLE_METRICS) -> pd.DataFrame:
    rows = []
    for method, values in (methods or report["methods"]).items():
        rows.append(
            {
                "method": method,
                **{m: f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f}" for m in metrics if m in values},
            }
        )
    return pd.DataFrame(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: a plot colours a method by its family (gpl_platform/prerank/methods.py)
FAMILY_COLORS = {"gpl": "#c44e52", "ablation": "#dd8452", "baseline": "#4c72b0", "control": "#8c8c8c", None: "#4c72b0"}


def family_of(name: str) -> str | None:
    """A method's family, or None for a name no longer registered (an old report)."""
    from gpl_platform.prerank.methods import REGISTRY

    return REGISTRY[name].family if name in REGISTRY else None


def plot_metric_bars(report: dict, path: Path) -> Path:
    plt = _plt()
    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4 * len(BAR_METRICS), 4), sharey=False)
    for ax, metric in zip(axes, BAR_METRICS):
        means = [report["methods"][m][metric]["mean"] for m in methods]
        stds = [report["methods"][m][metric]["std"] for m in methods]
        colors = [FAMILY_COLORS[family_of(m)] for m in methods]
        ax.barh(methods, means, xerr=stds, color=colors)
        finite = [v for v in means if np.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_xlim(max(0, lo - (hi - lo) * 0.6 - 0.01), hi + (hi - lo) * 0.3 + 0.01)
        ax.set_title(metric)
        ax.invert_yaxis()
    fig.suptitle(f"{report['dataset']}: test metrics, mean ± std over seeds {report['seeds']}")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_calibration(pseudo: pd.DataFrame, path: Path, bins: int = 10) -> Path:
    """Pseudo-label vs the oracle positive rate of the same (unexposed, training-day) candidates."""
    plt = _plt()
    frame = pseudo.assign(bin=pd.cut(pseudo["pseudo_label"], np.linspace(0, 1, bins + 1), include_lowest=True))
    table = frame.groupby("bin", observed=True).agg(
        pred=("pseudo_label", "mean"), real=("oracle_label", "mean"), n=("oracle_label", "size")
    )
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot(table["pred"], table["real"], "o-", color="#c44e52")
    for _, r in table.iterrows():
        ax.annotate(str(int(r["n"])), (r["pred"], r["real"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("pseudo-label (calibrated similarity)")
    ax.set_ylabel("oracle positive rate")
    ax.set_title("pseudo-label calibration (unexposed, train days)")
    fig.tight_layout()
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def render_markdown(report: dict, directory: Path, stem: str = "offline_eval") -> Path:
    directory = Path(directory)
    bars = plot_metric_bars(report, directory / f"{stem}_metrics.png")
    lift = plot_longtail_lift(report, directory / f"{stem}_longtail_lift.png")
    lines = [
        f"# Offline evaluation: {report['dataset']}",
        "",
        f"Seeds {report['seeds']}; split {report['split']}; {report['n_test_requests']} test requests, "
        f"{report['n_test_candidates']} test candidates; feature service `{report['feature_service']}`; "
        f"lambda {report['training_config']['pseudo_weight']}.",
        "",
        results_table(report).to_markdown(index=False),
        "",
        f"![metrics]({bars.name})",
        "",
        f"![long-tail lift]({lift.name})",
        "",
    ]
    for name, entry in report.get("prerankers", {}).items():
        lines += [
            f"## Pre-ranker `{name}`: by exposure and item exposure history, and on validation days",
            "",
            f"Test candidates by the item's exposures in the training days: "
            f"{report.get('test_candidates_by_item_exposure')}; ips propensities: "
            f"{entry.get('ips_propensity')}.",
            "",
            results_table(report, entry["methods"], SEGMENT_METRICS).to_markdown(index=False),
            "",
        ]
    ceiling = report.get("ceiling", {}).get("rows")
    if ceiling:
        lines += [
            "## Pseudo-label ceiling",
            "",
            "AUC of the pseudo-labels against the oracle on unexposed candidates, next to `exposed_only`'s "
            "own AUC on the same candidates (seed 0) and the Bayes ceiling `bayes_auc` (the true click "
            "probability as the score, where the source knows it: the best any label could do): GPL can add "
            "information only where its labels rank better than `exposed_only`, and no label ranks better "
            "than `bayes_auc`.",
            "",
            pd.DataFrame(ceiling).to_markdown(index=False, floatfmt=".4f"),
            "",
        ]
    lines += exploration_check_lines(report.get("exploration"))
    pseudo = report.get("_details", {}).get("pseudo_main")
    if pseudo is not None and len(pseudo):
        cal = plot_calibration(pseudo, directory / f"{stem}_calibration.png")
        lines += [f"![calibration]({cal.name})", ""]
    path = directory / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def exploration_check_lines(section: dict | None) -> list[str]:
    """The exploration slice's estimates (what a real log would report) next to the oracle's truth over every
    candidate of the same requests: how well the slice would judge the methods."""
    if not section or not section.get("methods"):
        return []
    rows = [
        {
            "method": method,
            **{f"{metric} slice [95%]": interval_cell(v[metric]) for metric in SLICE_METRICS},
            **{f"{metric} oracle": section["oracle"][method][metric] for metric in SLICE_METRICS},
        }
        for method, v in section["methods"].items()
    ]
    return [
        "## The exploration slice against the oracle",
        "",
        f"{section['requests']} test requests were served uniformly at random: the slice's estimates from their "
        "shown rows' clicks (as a real log would report them) next to the oracle over every candidate of the "
        "same requests (hr@10: recall@10).",
        "",
        pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"),
        "",
    ]


BEGIN, END = "<!-- results:begin (generated by gpl evaluate --results-doc) -->", "<!-- results:end -->"


def results_section(report: dict, invocation: str, commit: str) -> str:
    return "\n".join(
        [
            BEGIN,
            "",
            f"Generated by `{invocation}` at commit `{commit}` (dataset `{report['dataset']}`, seeds "
            f"{report['seeds']}, lambda {report['training_config']['pseudo_weight']}, split {report['split']}, "
            f"{report['n_test_requests']} test requests / {report['n_test_candidates']} test candidates, "
            f"{report['seconds']} s).",
            "",
            results_table(report).to_markdown(index=False),
            "",
            END,
        ]
    )


def update_results_doc(path: Path, report: dict, invocation: str, commit: str) -> Path:
    """Replace the generated section of ``path`` (create the file if needed); hand-written text stays."""
    return replace_generated_section(path, BEGIN, END, results_section(report, invocation, commit))


def replace_generated_section(path: Path, begin: str, end: str, section: str) -> Path:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) where those markers stand in
    ``path``, or append it; everything outside the markers stays. Written atomically."""
    import os

    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """``out`` (JSON), and beside it a markdown report with plots (PNG)."""
    out = write_json({k: v for k, v in report.items() if not k.startswith("_")}, out)
    scores = report["_details"]["scores_frame"]
    if scores is not None:  # every run's test scores, for intervals over requests, seeds and worlds
        path = scores_path(out)
        scores.to_parquet(path.with_suffix(".parquet.tmp"), index=False)
        os.replace(path.with_suffix(".parquet.tmp"), path)
    markdown = render_markdown(report, out.parent, stem=out.stem)
    return {"json": out, "markdown": markdown}
