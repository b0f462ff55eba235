"""Training and evaluation assets (group ``training``; docs/METHOD.md step 5 and "Evaluation metrics")."""

import json

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.automation import Automation
from assets.ingestion import POOL
from assets.metadata import table_md
from assets.resources import FeatureStoreResource, GplSettings, WarehouseResource
from gpl_platform.data.policies import held_out_of_training
from gpl_platform.prerank import data
from gpl_platform.quality.gate import failing_event_days, failing_label_days
from gpl_platform.quality.results import QualityGateError
from gpl_platform.thresholds import quality_config

GROUP = "training"
FEATURES = ["user_features", "item_features", "profile_features", "feast_registry"]
TRAINING_METHOD = "gpl"


def training_assets(automation: Automation) -> list:
    @asset(
        group_name=GROUP,
        kinds={"duckdb"},
        deps=["pseudo_labels", "candidate_events"],
        pool=POOL,
        automation_condition=automation.training,
    )
    def training_set(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """GPL training rows over the days before the validation/test cutoff: exposed candidates with their
        clicks, unexposed candidates with pseudo-labels and weight lambda * confidence. Days whose events
        fail their gate (implausible click or exposure rates) are left out whole; days whose pseudo-labels
        fail theirs are left out of the pseudo rows. Features are not stored: they come from Feast
        point-in-time at training time."""
        settings = gpl.settings()
        wh = warehouse.get()
        cfg = settings.training
        gates = quality_config(settings)
        split = data.time_split(wh, cfg.test_share, cfg.valid_share)
        # The checks judged each partition when it was written; a later run re-checks what it is about to
        # consume, so a partition that failed (or was corrupted since) never reaches training.
        chunk_rows = settings.streaming.batch_candidates
        bad_events = failing_event_days(wh, split.train_days, gates.events, chunk_rows)
        failing = {
            **failing_label_days(wh, split.train_days, gates.pseudo_labels, chunk_rows=chunk_rows),
            **{d: f"events: {why}" for d, why in bad_events.items()},
        }
        for day, why in sorted(failing.items()):
            context.log.warning("%s fails a quality gate and is not consumed: %s", day, why)
        if len(failing) > cfg.max_failing_label_days_share * len(split.train_days):
            raise QualityGateError(
                f"training_set refuses to train: {len(failing)} of {len(split.train_days)} training days fail a "
                f"quality gate (more than training.max_failing_label_days_share={cfg.max_failing_label_days_share})"
                ":\n" + "\n".join(f"  {d}: {why}" for d, why in sorted(failing.items()))
            )
        train_days = [d for d in split.train_days if d not in bad_events]
        lineage = data.pseudo_label_lineage(wh, split.train_days)
        with wh.transaction() as con:
            stats = data.write_training_set(
                con,
                TRAINING_METHOD,
                train_days,
                set(train_days) - set(failing),
                cfg,
                settings.seed,
                batch_candidates=settings.streaming.batch_candidates,
                duckdb_memory_limit=settings.streaming.duckdb_memory_limit,
                held_out_policies=held_out_of_training(settings.evaluation),
            )
            if not stats["rows"]:
                raise ValueError(
                    f"training_set: no training rows over {len(train_days)} usable training days "
                    f"({split.describe()['train_days']}); deliver more days"
                )
            con.execute(
                "INSERT OR REPLACE INTO warehouse_meta VALUES ('training_set_lineage', ?)",
                [
                    json.dumps(
                        {
                            "split": split.describe(),
                            "pseudo_labels": lineage,
                            "method": TRAINING_METHOD,
                            "pseudo_weight": cfg.pseudo_weight,
                            "days_refused": sorted(map(str, failing)),
                        },
                        default=str,
                    )
                ],
            )
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats["rows"],
                "actual_rows": stats["actual_rows"],
                "pseudo_rows": stats["pseudo_rows"],
                "split": MetadataValue.json(split.describe()),
                "pseudo_label_mean": stats["pseudo_label_mean"],
                "click_rate_actual": stats["click_rate_actual"],
                "pseudo_weight_mean": stats["pseudo_weight_mean"],
                "label_days_consumed": len(split.train_days) - len(failing),
                "label_days_refused": len(failing),
                "event_days_refused": len(bad_events),
                "refused_days": table_md(
                    pd.DataFrame(
                        {"day": [str(d) for d in sorted(failing)], "reason": [failing[d] for d in sorted(failing)]}
                    )
                )
                if failing
                else "none",
                "lineage": MetadataValue.json(lineage),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"pytorch"},
        deps=["training_set", *FEATURES],
        pool=POOL,
        automation_condition=automation.after("training_set"),
    )
    def prerank_model(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        feature_store: FeatureStoreResource,
    ) -> MaterializeResult:
        """The light PyTorch pre-ranker trained on the training set with L = BCE(actual) + lambda * w *
        BCE(pseudo); early stopping on later days' exposed clicks; saved with its lineage."""
        from gpl_platform.prerank.pipeline import train_from_training_set

        result = train_from_training_set(warehouse.get(), feature_store.get(), gpl.settings())
        context.log.info("model %s saved to %s", result["version"], result["path"])
        return MaterializeResult(
            metadata={
                "version": result["version"],
                "path": MetadataValue.path(result["path"]),
                "best_valid_auc": result["training"]["best_valid_auc"],
                "budget": result["training"]["budget"],
                "steps": result["training"]["steps"],
                "epochs_run": result["training"]["epochs_run"],
                "best_step": result["training"]["best_step"],
                "hit_cap": result["training"]["hit_cap"],
                "rows": result["training"]["n_rows"],
                "pseudo_rows": result["training"]["n_pseudo"],
                "lineage": MetadataValue.json(result["lineage"]),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"pytorch"},
        pool=POOL,
        automation_condition=automation.after("prerank_model"),
        deps=["pseudo_labels", "history_anchor_pseudo_labels", "sid_anchor_pseudo_labels", "prerank_model", *FEATURES],
    )
    def offline_evaluation(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        feature_store: FeatureStoreResource,
    ) -> MaterializeResult:
        """Every method (baselines, GPL and its ablations) trained on the same rows and features under several
        seeds. With oracle labels (the benchmark sources): scored on the test days' whole candidate set
        against them (report offline_eval.*). Without (real logs): scored on what logs allow, the exposed
        test candidates' clicks, and an inverse-propensity estimate over all candidates where the log has
        propensities (report logged_eval.*, labelled as such)."""
        from gpl_platform.evaluation import logged
        from gpl_platform.evaluation.report import results_table

        settings = gpl.settings()
        wh = warehouse.get()
        gates = quality_config(settings)
        if not logged.has_ground_truth(wh):
            report, paths = logged.evaluate_and_write(wh, feature_store.get(), settings, gates)
            context.log.info("no oracle labels: logged-data evaluation (%s)", paths["json"])
            return MaterializeResult(
                metadata={
                    "evaluation": "logged data only (no oracle labels): exposed test clicks; IPS over all candidates "
                    "where propensities are logged",
                    "results": table_md(logged.results_table(report)),
                    "report_json": MetadataValue.path(str(paths["json"])),
                    "report_markdown": MetadataValue.path(str(paths["markdown"])),
                    "seconds": report["seconds"],
                    "skipped_methods": MetadataValue.json(report["skipped_methods"]),
                    "split": MetadataValue.json(report["split"]),
                    "label_audit": MetadataValue.json(report.get("label_audit") or {}),
                }
            )
        from gpl_platform.evaluation.report import write_reports
        from gpl_platform.evaluation.tuning import evaluate_with_oracle

        report = evaluate_with_oracle(wh, feature_store.get(), settings, gates.pseudo_labels)
        paths = write_reports(report, settings.data_dir / "reports" / "offline_eval.json")
        return MaterializeResult(
            metadata={
                "evaluation": "oracle labels: every test candidate",
                "results": table_md(results_table(report)),
                "report_json": MetadataValue.path(str(paths["json"])),
                "report_markdown": MetadataValue.path(str(paths["markdown"])),
                "seconds": report["seconds"],
                "seeds": MetadataValue.json(report["seeds"]),
                "split": MetadataValue.json(report["split"]),
            }
        )

    return [training_set, prerank_model, offline_evaluation]
