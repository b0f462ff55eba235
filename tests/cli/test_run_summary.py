"""The end-of-run summary of `gpl run` (gpl_platform/cli/summary.py)."""

from __future__ import annotations

import json

from gpl_platform.cli.summary import CHECK_LINE_CHARS, check_lines, is_logged_report, read_report, render_run_summary


def metric(mean, std):
    return {"mean": mean, "std": std}


def compared(against, diff, lo, hi):
    return {"method": "gpl", "against": against, "metric": "unexposed_gauc", "diff": diff, "ci95": [lo, hi]}


REPORT = {
    "method_families": {"exposed_only": "baseline", "ips": "baseline", "gpl": "gpl", "gpl_request_permuted": "control"},
    "comparisons": [
        compared("exposed_only", 0.02, 0.011, 0.029),
        compared("ips", -0.03, -0.04, -0.02),
        compared("gpl_request_permuted", 0.004, -0.002, 0.010),
    ],
    "dataset": "movielens-100k",
    "preranker": "mlp:prerank_v2",
    "seeds": [0, 1],
    "split": {"test_days": ["1998-03-25", "1998-04-22", 29]},
    "methods": {
        "exposed_only": {
            "unexposed_gauc": metric(0.60, 0.01),
            "auc": metric(0.70, 0.002),
            "unexposed_auc": metric(0.66, 0.003),
            "hr@10": metric(0.41, 0.01),
        },
        "gpl": {
            "unexposed_gauc": metric(0.62, 0.01),
            "auc": metric(0.71, 0.001),
            "unexposed_auc": metric(0.68, 0.002),
            "hr@10": metric(0.43, 0.02),
        },
        "ips": {
            "unexposed_gauc": metric(float("nan"), float("nan")),
            "auc": metric(0.69, 0.004),
            "unexposed_auc": metric(float("nan"), float("nan")),
            "hr@10": metric(0.40, 0.01),
        },
        "gpl_request_permuted": {"unexposed_gauc": metric(0.615, 0.01)},
    },
}


def test_summary_has_the_table_sorted_the_lift_the_report_the_ui_and_one_line_per_check(tmp_path):
    report_path = tmp_path / "offline_eval.json"
    (tmp_path / "offline_eval_metrics.png").write_bytes(b"png")
    checks = [
        "pseudo_labels.pseudo_labels_distribution: " + "day 1997-10-01 std 0.001 < 0.005; " * 40,
        "user_anchors.anchors_fallback_share: 12% of users fell back",
    ]
    lines = render_run_summary(checks, REPORT, report_path, full_evaluation_hint=True)
    text = "\n".join(lines)
    rows = [
        line for line in lines if line.startswith("  ") and line.split()[0] in REPORT["methods"] and " - " not in line
    ]
    # best per-request unexposed GAUC first, NaN last
    assert [r.split()[0] for r in rows] == ["gpl", "gpl_request_permuted", "exposed_only", "ips"]
    assert "0.6800 ± 0.0020" in text and "n/a" in text
    assert "4 methods x 2 seed(s) [0, 1], test days 1998-03-25..1998-04-22 (29 days)" in text
    # the best baseline by unexposed GAUC (ips has none), and the best control, each with its interval
    baseline = "gpl - best baseline (exposed_only): unexposed_gauc +0.0200, 95% interval [+0.0110, +0.0290]"
    control = "gpl - best control (gpl_request_permuted): unexposed_gauc +0.0040, 95% interval [-0.0020, +0.0100]"
    assert baseline + " (above 0)" in text and control + " (includes 0)" in text
    assert f"Report: {tmp_path / 'offline_eval.md'}" in text and "offline_eval_metrics.png" in text
    assert "make ui -> http://127.0.0.1:3000" in text and "make evaluate" in text
    check_rows = [line for line in lines if line.startswith("  - ")]
    assert len(check_rows) == 2 and all(len(r) <= CHECK_LINE_CHARS + 4 for r in check_rows)
    assert check_rows[0].endswith("…") and check_rows[1].endswith("fell back")
    assert "2 quality check(s) failed" in text


def test_no_checks_no_check_section_and_no_evaluation_said_so(tmp_path):
    assert check_lines([]) == []
    lines = render_run_summary([], None, tmp_path / "offline_eval.json", full_evaluation_hint=False)
    assert any("No evaluation in this run" in line for line in lines)
    assert not any("make evaluate" in line for line in lines)


def test_the_summary_reads_the_report_the_run_returned(tmp_path):
    """The run says which report it wrote (PipelineResult.reports): none, the summary shows none, whatever
    an earlier run left in the folder; the logged-data report is told apart by its name."""
    path = tmp_path / "offline_eval.json"
    path.write_text(json.dumps(REPORT))
    assert read_report(None) is None
    assert read_report(path)["dataset"] == "movielens-100k"
    path.write_text("{not json")
    assert read_report(path) is None
    assert is_logged_report(tmp_path / "logged_eval.json") and not is_logged_report(path)


def test_a_young_delivery_says_gpl_was_not_compared_and_why(tmp_path):
    """A 3-day world: no training day has pseudo-labels, so GPL and its controls are skipped, not shown as a
    tie with exposed_only; the summary names them, the reason, and what to do."""
    why = "no pseudo-labelled training rows (no training day has pseudo-labels, e.g. no calibration yet)"
    report = {
        **REPORT,
        "methods": {"exposed_only": REPORT["methods"]["exposed_only"]},
        "comparisons": [],
        "skipped_methods": {"gpl": why, "gpl_request_permuted": why, "pseudo_only": "no training rows"},
    }
    lines = render_run_summary([], report, tmp_path / "offline_eval.json", full_evaluation_hint=False)
    assert f"  skipped gpl, gpl_request_permuted: {why}" in lines
    assert "  skipped pseudo_only: no training rows" in lines
    assert any(line.startswith("GPL was not compared: its training days have no pseudo-labels") for line in lines)
    assert not any("gpl - best" in line for line in lines)
    full = render_run_summary([], REPORT, tmp_path / "offline_eval.json", full_evaluation_hint=False)
    assert not any("GPL was not compared" in line or "skipped" in line for line in full)
