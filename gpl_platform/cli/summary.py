"""The end of `gpl run`: a summary a person reads in ten seconds.

The results table (method, AUC, unexposed AUC, HR@10 as mean ± std over seeds, when this run
produced an evaluation: the report the run says it wrote), where the report and plots are, how to open
the UI, how to run the full evaluation when the run was the demo's smaller one, and one short line per
failed quality check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gpl_platform.config import Settings

#: the columns of the results table: report key -> header
TABLE_METRICS = {"unexposed_gauc": "unexposed GAUC", "auc": "AUC", "unexposed_auc": "unexposed AUC", "hr@10": "HR@10"}
#: a failed check's line is cut to this many characters (the Dagster UI has the whole text)
CHECK_LINE_CHARS = 160
#: the name of the report of an evaluation without oracle labels (gpl_platform/evaluation/logged.py)
LOGGED_REPORT_STEM = "logged_eval"


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key) or {}
    mean, std = value.get("mean"), value.get("std")
    if mean is None or mean != mean:  # missing or NaN
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def results_table(report: dict) -> list[str]:
    """Lines of the headline pre-ranker's table, best per-request unexposed GAUC first, GPL's lift over
    exposed_only."""
    methods: dict = report.get("methods") or {}
    if not methods:
        return []
    split = report.get("split") or {}
    test_days = list(split.get("test_days") or ["?", "?"])  # [first, last, count]
    seeds = report.get("seeds") or []
    days = f"{test_days[0]}..{test_days[1]}" + (f" ({test_days[2]} days)" if len(test_days) > 2 else "")
    lines = [
        f"Offline evaluation ({report.get('dataset', '?')}, pre-ranker {report.get('preranker', 'mlp')}, "
        f"{len(methods)} methods x {len(seeds)} seed(s) {seeds}, test days {days}); "
        "mean ± std over seeds:"
    ]
    width = max(len("method"), *(len(m) for m in methods)) + 2
    lines.append("  " + "method".ljust(width) + "".join(h.rjust(20) for h in TABLE_METRICS.values()))

    def order(item) -> float:
        value = (item[1].get("unexposed_gauc") or item[1].get("unexposed_auc") or {}).get("mean")
        return -(value if value is not None and value == value else float("-inf"))

    for method, metrics in sorted(methods.items(), key=order):
        lines.append("  " + method.ljust(width) + "".join(_cell(metrics, k).rjust(20) for k in TABLE_METRICS))
    lines += comparison_lines(report)
    lines += skipped_lines(report)
    return lines


def skipped_lines(report: dict) -> list[str]:
    """The methods the evaluation skipped (nothing to learn from), one line per reason; when GPL is among
    them, a line saying the run could not compare it (a small or young delivery)."""
    skipped: dict[str, str] = report.get("skipped_methods") or {}
    by_reason: dict[str, list[str]] = {}
    for method, reason in skipped.items():
        by_reason.setdefault(reason, []).append(method)
    lines = [f"  skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    if "gpl" in skipped:
        lines.append(
            "GPL was not compared: its training days have no pseudo-labels (a day is labelled once a calibration "
            "fitted on earlier days' exposed clicks exists). Deliver more days, or move the split "
            "(training.valid_share, training.test_share), and run again."
        )
    return lines


def _best(methods: dict, families: dict, family: str, metric: str = "unexposed_gauc") -> str | None:
    """The method of ``family`` with the highest mean ``metric``."""
    scored = [
        (value, m)
        for m, metrics in methods.items()
        if families.get(m) == family
        and (value := (metrics.get(metric) or {}).get("mean")) is not None
        and value == value
    ]
    return max(scored)[1] if scored else None


def comparison_lines(report: dict, metric: str = "unexposed_gauc") -> list[str]:
    """GPL against the best baseline and the best control on per-request unexposed GAUC, each difference with
    its 95% interval (bootstrap over test requests and seeds), and what the claim rule then says."""
    methods, families = report.get("methods") or {}, report.get("method_families") or {}
    found = {(c["against"], c["metric"]): c for c in report.get("comparisons") or [] if c.get("method") == "gpl"}
    lines = []
    for family in ("baseline", "control"):
        best = _best(methods, families, family, metric)
        entry = found.get((best, metric))
        if entry is None:
            continue
        lo, hi = entry["ci95"]
        interval = f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None else "[n/a]"
        verdict = "above 0" if lo is not None and lo > 0 else "below 0" if hi is not None and hi < 0 else "includes 0"
        lines.append(
            f"  gpl - best {family} ({best}): {metric} {entry['diff']:+.4f}, 95% interval {interval} ({verdict})"
        )
    return lines


def check_lines(failed_checks: Sequence[str]) -> list[str]:
    """One short line per failed check (``asset.check: description``, cut to :data:`CHECK_LINE_CHARS`)."""
    if not failed_checks:
        return []
    lines = [
        f"{len(failed_checks)} quality check(s) failed; days failing the blocking pseudo-label gate were "
        "left out downstream (whole texts: Dagster UI, asset checks):"
    ]
    for text in failed_checks:
        flat = " ".join(str(text).split())
        if len(flat) > CHECK_LINE_CHARS:
            flat = flat[: CHECK_LINE_CHARS - 1].rstrip() + "…"
        lines.append(f"  - {flat}")
    return lines


def is_logged_report(report_path: Path) -> bool:
    """The report of an evaluation of real logs (no oracle labels), not the benchmark's."""
    return report_path.stem == LOGGED_REPORT_STEM


def read_report(report_path: Path | None) -> dict | None:
    """The report a run wrote (the path it returned; None: it wrote none), None if unreadable."""
    if report_path is None:
        return None
    try:
        return json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def logged_table(report: dict, report_path: Path) -> list[str]:
    """Without oracle labels the evaluation measures what logs allow: its table and where its report is."""
    from gpl_platform.evaluation.logged import results_table as logged_results

    return [
        f"Logged-data evaluation ({report.get('what', 'exposed test clicks')}):",
        *("  " + line for line in logged_results(report).to_string(index=False).splitlines()),
        f"Report: {report_path.with_suffix('.md')}",
    ]


def render_run_summary(
    failed_checks: Sequence[str],
    report: dict | None,
    report_path: Path | None,
    full_evaluation_hint: bool,
    ui_url: str = "http://127.0.0.1:3000",
    logged: dict | None = None,
    logged_path: Path | None = None,
    ui_command: str = "make ui",
) -> list[str]:
    lines = ["", "=" * 30 + " summary " + "=" * 30]
    if logged is not None and logged_path is not None:
        lines += logged_table(logged, logged_path)
    if report is not None:
        lines += results_table(report)
        plots = sorted(p.name for p in report_path.parent.glob(f"{report_path.stem}*.png"))
        lines.append(
            f"Report: {report_path.with_suffix('.md')}"
            + (f"  plots: {', '.join(plots)} (same folder)" if plots else "")
        )
        if full_evaluation_hint:
            lines.append("This was the demo's evaluation; the full one (every method, seeds 0-2): make evaluate")
    elif logged is None:
        lines.append("No evaluation in this run (offline_evaluation was not selected).")
    lines.append(f"Dagster UI (asset graph, runs, checks): {ui_command} -> {ui_url}")
    lines += check_lines(failed_checks)
    return lines


def print_run_summary(failed_checks: Sequence[str], settings: Settings, report_path: Path | None, echo=print) -> None:
    """Print the summary of a `gpl run` with ``settings`` whose evaluation wrote ``report_path`` (None: the
    run evaluated nothing)."""
    from gpl_platform.cli.instance import is_default_data_dir

    data_dir = settings.data_dir
    logged = report_path is not None and is_logged_report(report_path)
    report = read_report(report_path)
    demo = os.environ.get("GPL_DEMO") == "1"
    # the UI shows the instance of one data directory
    ui_command = "make ui" if is_default_data_dir(data_dir) else f"GPL_DATA_DIR={data_dir} make ui"
    for line in render_run_summary(
        failed_checks,
        None if logged else report,
        report_path,
        full_evaluation_hint=demo,
        logged=report if logged else None,
        logged_path=report_path if logged else None,
        ui_command=ui_command,
    ):
        echo(line)
