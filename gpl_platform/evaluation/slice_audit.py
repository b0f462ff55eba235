"""The pseudo-labels checked on the exploration slice (docs/OPERATIONS.md, "Evaluation of real logs").

What an exploration policy showed did not depend on the production system, so the clicks of those rows are
the cleanest outcome to hold GPL's labels against. The slice's shown rows get no pseudo-label (only unexposed
candidates are labelled), but their similarities are computed like every candidate's: each is mapped through
the calibration that labelled the same request's unexposed candidates, which gives the label the row would
have had. Reported: the AUC of each pooling's similarity and label against the clicks, and the mean label
next to the click rate (calibration).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from gpl_platform.data.sql import quote_literal
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.metrics import auc
from gpl_platform.pseudo_labels.calibration import Calibration

POOLINGS = {
    "max_pool": ("similarity_max", "calibration_version"),
    "mean_pool": ("similarity_mean", "calibration_version_mean_pool"),
}


def slice_rows(warehouse: Warehouse, policies: Sequence[str]) -> pd.DataFrame:
    """The slice's shown rows with their click, similarities and the calibration versions of their request."""
    listed = ", ".join(quote_literal(p) for p in policies)
    return warehouse.query(
        f"""
        WITH versions AS (
            SELECT day, request_id, any_value(calibration_version) AS calibration_version,
                   any_value(calibration_version_mean_pool) AS calibration_version_mean_pool
            FROM pseudo_labels GROUP BY day, request_id
        )
        SELECT e.clicked, s.similarity_max, s.similarity_mean, v.calibration_version, v.calibration_version_mean_pool
        FROM events e
        JOIN candidate_similarities s USING (day, request_id, item_id)
        JOIN versions v USING (day, request_id)
        WHERE e.exposed AND e.logging_policy IN ({listed}) AND s.similarity_max IS NOT NULL
        """
    )


def slice_label_audit(warehouse: Warehouse, policies: Sequence[str]) -> dict:
    """AUC and mean of the labels the slice's shown rows would have had, against their clicks."""
    needed = ("pseudo_labels", "candidate_similarities", "calibrations")
    if not list(policies) or not all(warehouse.table_exists(t) for t in needed):
        return {"rows": 0, "unavailable": "no exploration policy, or no pseudo-labels yet"}
    rows = slice_rows(warehouse, list(policies))
    if rows.empty or rows["clicked"].nunique() < 2:
        return {"rows": int(len(rows)), "unavailable": "the slice has no labelled shown candidates of both classes"}
    stored = warehouse.query("SELECT DISTINCT version, calibration_json FROM calibrations")
    calibrations = {v: Calibration.from_json(j) for v, j in zip(stored["version"], stored["calibration_json"])}
    y = rows["clicked"].to_numpy(int)
    out: dict = {"rows": int(len(rows)), "click_rate": float(y.mean())}
    for name, (similarity, version) in POOLINGS.items():
        labels = np.full(len(rows), np.nan)
        for key, index in rows.groupby(version).groups.items():
            if key in calibrations:
                labels[index] = calibrations[key].predict(rows.loc[index, similarity].to_numpy(float))
        known = ~np.isnan(labels)
        out[f"{name}_similarity_auc"] = auc(y, rows[similarity].to_numpy(float))
        out[f"{name}_auc"] = auc(y[known], labels[known]) if len(set(y[known])) == 2 else float("nan")
        out[f"{name}_mean_label"] = float(labels[known].mean()) if known.any() else float("nan")
    return out
