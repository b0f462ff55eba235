"""Quality assets (group ``quality``): the label audit, pseudo-labels of day D against real clicks when
the same user is shown the same item on a later day (gpl_platform/pseudo_labels/audit.py). Unpartitioned: each
materialization audits every labelled day with the exposures known so far, and stores the tables in
the warehouse. The asset checks are in assets/checks.py."""

import base64
import io

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.automation import Automation
from assets.ingestion import POOL
from assets.metadata import table_md
from assets.resources import WarehouseResource
from gpl_platform.pseudo_labels import audit as audit_lib

GROUP = "quality"
AUDIT_TABLES = ("label_audit_pairs", "label_audit_reliability", "label_audit_by_lag", "label_audit_by_day")


def _reliability_plot(result: audit_lib.AuditResult) -> MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    rel = result.reliability
    axes[0].plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
    if len(rel):
        axes[0].scatter(
            rel["mean_pseudo_label"], rel["click_rate"], s=10 + 90 * rel["n"] / rel["n"].max(), color="#4a72b0"
        )
    axes[0].set(xlim=(0, 1), ylim=(0, 1), xlabel="mean pseudo-label", ylabel="later click rate")
    axes[0].set_title("reliability", fontsize=9)
    by_day = result.by_day
    if len(by_day):
        x = pd.to_datetime(by_day["label_day"])
        axes[1].plot(x, by_day["mean_pseudo_label"], marker="o", label="mean pseudo-label")
        axes[1].plot(x, by_day["click_rate"], marker="o", label="later click rate")
        axes[1].legend(fontsize=7)
        axes[1].tick_params(axis="x", labelsize=7, rotation=30)
    axes[1].set_title("over time (by labelled day)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return MetadataValue.md(f"![label audit](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def _num(value) -> float | int | str:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else "n/a"
    return str(value)


def quality_assets(automation: Automation) -> list:
    @asset(
        group_name=GROUP,
        kinds={"duckdb"},
        deps=["pseudo_labels", "candidate_events"],
        pool=POOL,
        automation_condition=automation.audit,
    )
    def label_audit(context: AssetExecutionContext, warehouse: WarehouseResource) -> MaterializeResult:
        """Label audit: every unexposed, pseudo-labelled candidate of day D that the same user is later shown
        (exposed, with a real click label) is compared with that click. Calibration by label bin, by lag and
        by labelled day; tables label_audit_* in the warehouse. Later exposure is not random: a biased
        sample, but the one production has."""
        wh = warehouse.get()
        result = audit_lib.audit_warehouse(wh)
        frames = {
            "label_audit_pairs": result.pairs,
            "label_audit_reliability": result.reliability,
            "label_audit_by_lag": result.by_lag,
            "label_audit_by_day": result.by_day,
        }
        with wh.transaction() as con:
            for name, frame in frames.items():
                out = frame.copy()
                for col in out.columns:  # categoricals (bins, lag buckets) as text
                    if isinstance(out[col].dtype, pd.CategoricalDtype):
                        out[col] = out[col].astype(str)
                wh.replace_table(name, out, con)
        s = result.summary
        context.log.info("label audit: %s", s)
        if not s["pairs"]:
            context.log.warning("no pseudo-labelled candidate has been exposed to its user later yet: nothing to audit")
        return MaterializeResult(
            metadata={
                "dagster/row_count": int(s["pairs"]),
                **{k: _num(v) for k, v in s.items()},
                "reliability": table_md(result.reliability, floatfmt=".3f")
                if len(result.reliability)
                else "no pairs yet",
                "by_lag": table_md(result.by_lag, floatfmt=".3f") if len(result.by_lag) else "no pairs yet",
                "by_labelled_day": table_md(result.by_day, floatfmt=".3f") if len(result.by_day) else "no pairs yet",
                "plot": _reliability_plot(result),
                "tables": ", ".join(AUDIT_TABLES),
            }
        )

    return [label_audit]
