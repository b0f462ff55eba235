"""The test scores of an evaluation (every method's score of every test candidate, per pre-ranker and seed,
beside the report as `<report>_scores.parquet`), and GPL's paired comparisons read from them: per request,
over worlds, seeds and test requests (:mod:`gpl_platform.evaluation.uncertainty`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def scores_path(report_json: Path) -> Path:
    """Where :func:`gpl_platform.evaluation.report.write_reports` keeps every run's test scores beside a report."""
    return Path(report_json).with_name(Path(report_json).stem + "_scores.parquet")


def test_scores_frame(report: dict) -> pd.DataFrame | None:
    """The test candidates (request, item, exposed, oracle label, item segment) with one column of scores per
    run, named ``<pre-ranker>|<method>|<seed>``; None for a selection run (no test days)."""
    details = report.get("_details") or {}
    test, scores = details.get("test"), details.get("scores") or {}
    if test is None or not len(test):
        return None
    keep = [
        c for c in ("day", "request_id", "user_id", "item_id", "exposed", "oracle_label", "item_segment") if c in test
    ]
    frame = test[keep].reset_index(drop=True).copy()
    if "day" in frame:
        frame["day"] = frame["day"].astype(str)
    runs = {
        f"{preranker}|{method}|{seed}": values.astype(np.float32)
        for preranker, by_run in scores.items()
        for (method, seed), values in by_run.items()
    }
    return pd.concat([frame, pd.DataFrame(runs)], axis=1)


def unexposed_request_frames(scores: pd.DataFrame, preranker: str, methods: Sequence[str] | None = None) -> dict:
    """``{seed: paired per-request frame}`` of one pre-ranker's runs on the unexposed test candidates (the input
    of :mod:`gpl_platform.evaluation.uncertainty`, metrics ``unexposed_gauc``, ``unexposed_auc``,
    ``unexposed_hr@10``), from :func:`test_scores_frame`'s columns. Only seeds every method ran under."""
    from gpl_platform.evaluation.metrics import request_metrics
    from gpl_platform.evaluation.uncertainty import paired_frame

    runs: dict[int, dict[str, str]] = {}
    for column in scores.columns:
        parts = column.split("|")
        if len(parts) == 3 and parts[0] == preranker and (methods is None or parts[1] in methods):
            runs.setdefault(int(parts[2]), {})[parts[1]] = column
    names = set.intersection(*(set(by_method) for by_method in runs.values())) if runs else set()
    unexposed = ~scores["exposed"].to_numpy(bool)
    requests, labels = scores["request_id"].to_numpy(), scores["oracle_label"].to_numpy(int)
    return {
        seed: paired_frame(
            {
                m: request_metrics(requests, labels, scores[by_method[m]].to_numpy(float), unexposed)
                for m in sorted(names)
            }
        )
        for seed, by_method in sorted(runs.items())
    }


#: the metrics gpl is compared on against every other method, with intervals (unexposed test candidates)
COMPARED_METRICS = ("unexposed_gauc", "unexposed_auc", "unexposed_hr@10")


def method_comparisons(worlds: dict, preranker: str) -> list[dict]:
    """``gpl`` against every other method of one pre-ranker, per compared metric, with the 95% interval of
    the paired difference over the ``worlds`` (``{world: test scores frame}``), their seeds and their test
    requests; [] without gpl or another method."""
    from gpl_platform.evaluation.uncertainty import comparisons, methods_of

    per_request = {
        (world, seed): frame
        for world, world_scores in worlds.items()
        for seed, frame in unexposed_request_frames(world_scores, preranker).items()
    }
    present = methods_of(per_request) if per_request else []
    if "gpl" not in present or len(present) < 2:
        return []
    return comparisons(per_request, "gpl", [m for m in present if m != "gpl"], COMPARED_METRICS)
