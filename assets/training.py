"""Training and evaluation assets (GPL_METHOD.md step 5 and "Evaluation here")."""

import json

import pandas as pd
from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from assets.metadata import table_md
from assets.resources import GplSettings
from gpl_platform import quality
from gpl_platform.prerank import data

GROUP = "training"
FEATURES = [AssetKey("user_features"), AssetKey("item_features"), AssetKey("profile_features"),
            AssetKey("feast_registry")]
TRAINING_METHOD = "gpl"


def _store(settings):
    from gpl_platform.features.store import FeastStore

    return FeastStore(settings)


@asset(group_name=GROUP, kinds={"duckdb"}, deps=[AssetKey("pseudo_labels"), AssetKey("candidate_events")],
       description="GPL training rows over the days before the validation/test cutoff: exposed candidates with "
                   "their clicks, unexposed candidates with pseudo-labels and weight lambda * confidence. Features "
                   "are not stored: they come from Feast point-in-time at training time.")
def training_set(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    settings = gpl.settings()
    warehouse = gpl.warehouse()
    cfg = settings.training
    split = data.time_split(warehouse, cfg.test_share, cfg.valid_share)
    # The blocking label checks judged each partition when it was written; a later run re-checks what it
    # is about to consume, so a partition that failed (or was corrupted since) never reaches training.
    failing = quality.failing_label_days(warehouse, split.train_days, quality.quality_config(settings).pseudo_labels)
    for day, why in sorted(failing.items()):
        context.log.warning("pseudo-labels of %s fail the quality gate and are not consumed: %s", day, why)
    if len(failing) > cfg.max_failing_label_days_share * len(split.train_days):
        raise quality.QualityGateError(
            f"training_set refuses to train: {len(failing)} of {len(split.train_days)} pseudo-label partitions fail "
            f"the quality gate (more than training.max_failing_label_days_share={cfg.max_failing_label_days_share}):\n"
            + "\n".join(f"  {d}: {why}" for d, why in sorted(failing.items())))
    train = data.load_candidates(warehouse, split.train_days)
    pseudo = {"main": data.load_pseudo_labels(warehouse, [d for d in split.train_days if d not in failing])}
    plan = data.method_plan(TRAINING_METHOD, train, pseudo, cfg, settings.seed)
    rows = data.plan_frame(plan, train)
    lineage = data.pseudo_label_lineage(warehouse, split.train_days)
    with warehouse.transaction() as con:
        warehouse.replace_table("training_set", rows, con)
        con.execute("INSERT OR REPLACE INTO warehouse_meta VALUES ('training_set_lineage', ?)",
                    [json.dumps({"split": split.describe(), "pseudo_labels": lineage, "method": TRAINING_METHOD,
                                 "pseudo_weight": cfg.pseudo_weight}, default=str)])
    return MaterializeResult(metadata={
        "dagster/row_count": len(rows), "actual_rows": int((~rows["is_pseudo"]).sum()),
        "pseudo_rows": int(rows["is_pseudo"].sum()), "split": MetadataValue.json(split.describe()),
        "pseudo_label_mean": float(rows.loc[rows["is_pseudo"], "label"].mean()) if rows["is_pseudo"].any() else 0.0,
        "click_rate_actual": float(rows.loc[~rows["is_pseudo"], "label"].mean()),
        "pseudo_weight_mean": float(rows.loc[rows["is_pseudo"], "weight"].mean()) if rows["is_pseudo"].any() else 0.0,
        "label_days_consumed": len(split.train_days) - len(failing), "label_days_refused": len(failing),
        "refused_days": table_md(pd.DataFrame({"day": [str(d) for d in sorted(failing)],
                                               "reason": [failing[d] for d in sorted(failing)]}))
        if failing else "none",
        "lineage": MetadataValue.json(lineage),
    })


@asset(group_name=GROUP, kinds={"pytorch"}, deps=[training_set, *FEATURES],
       description="The light PyTorch pre-ranker trained on the training set with L = BCE(actual) + lambda * w * "
                   "BCE(pseudo); early stopping on later days' exposed clicks; saved with its lineage.")
def prerank_model(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    from gpl_platform.prerank.pipeline import train_from_training_set

    settings = gpl.settings()
    result = train_from_training_set(gpl.warehouse(), _store(settings), settings)
    context.log.info("model %s saved to %s", result["version"], result["path"])
    return MaterializeResult(metadata={
        "version": result["version"], "path": MetadataValue.path(result["path"]),
        "best_valid_auc": result["training"]["best_valid_auc"], "epochs_run": result["training"]["epochs_run"],
        "rows": result["training"]["n_rows"], "pseudo_rows": result["training"]["n_pseudo"],
        "lineage": MetadataValue.json(result["lineage"]),
    })


@asset(group_name=GROUP, kinds={"pytorch"},
       deps=[AssetKey("pseudo_labels"), AssetKey("history_anchor_pseudo_labels"), AssetKey("sid_anchor_pseudo_labels"),
             *FEATURES],
       description="Every method (baselines, GPL and its ablations) trained on the same rows and features under "
                   "several seeds, scored on the test days against the oracle labels; JSON + markdown report.")
def offline_evaluation(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    from gpl_platform.evaluation.offline import run_offline_evaluation, write_reports
    from gpl_platform.evaluation.report import results_table

    settings = gpl.settings()
    report = run_offline_evaluation(gpl.warehouse(), _store(settings), settings.training, settings.source,
                                    label_gate=quality.quality_config(settings).pseudo_labels,
                                    evaluation=settings.evaluation)
    paths = write_reports(report, settings.data_dir / "reports" / "offline_eval.json")
    return MaterializeResult(metadata={
        "results": table_md(results_table(report)), "report_json": MetadataValue.path(str(paths["json"])),
        "report_markdown": MetadataValue.path(str(paths["markdown"])), "seconds": report["seconds"],
        "seeds": MetadataValue.json(report["seeds"]), "split": MetadataValue.json(report["split"]),
    })
