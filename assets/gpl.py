"""GPL assets (group ``gpl``, docs/METHOD.md steps 1-4): item vectors, anchors, anchor vectors,
similarities, calibration, pseudo-labels, and the semantic IDs with their generator."""

from dataclasses import asdict

import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    BackfillPolicy,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    TimeWindowPartitionMapping,
    asset,
)

from assets.automation import Automation
from assets.ingestion import POOL
from assets.metadata import histogram_md, span, table_md
from assets.partitions import first_day, partition_days
from assets.resources import AnchorGeneratorResource, EncoderResource, EngineResource, GplSettings, WarehouseResource
from gpl_platform.config import CalibrationConfig
from gpl_platform.pseudo_labels.chain import LabellingChain
from gpl_platform.pseudo_labels.day_calibration import calibration_lookback_days
from gpl_platform.pseudo_labels.encoder import update_item_embeddings
from gpl_platform.pseudo_labels.stage_results import LabelGaps
from gpl_platform.pseudo_labels.stages import MAIN, StageTables

GROUP = "gpl"
SAME_DAY = TimeWindowPartitionMapping(start_offset=0, end_offset=0)


def gpl_assets(partitions: DailyPartitionsDefinition, automation: Automation, calibration: CalibrationConfig) -> list:
    per_day = {
        "partitions_def": partitions,
        "backfill_policy": BackfillPolicy.single_run(),
        "pool": POOL,
        "automation_condition": automation.follow_upstream,
        "group_name": GROUP,
    }

    @asset(
        group_name=GROUP,
        kinds={"duckdb", "sentence_transformers"},
        deps=["item_catalog"],
        pool=POOL,
        automation_condition=automation.follow_catalog,
    )
    def item_embeddings(
        context: AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
    ) -> MaterializeResult:
        """Frozen sentence-encoder vectors of the whole catalog (normalized float32); only new or changed
        item text is re-encoded."""
        model, wh = encoder.get(), warehouse.get()
        items = wh.query("SELECT item_id, text FROM items")
        with wh.connect() as con:  # update_item_embeddings runs its own transaction
            stats = update_item_embeddings(con, items, model, progress=False)
        context.log.info("item embeddings: %s", stats)
        return MaterializeResult(
            metadata={
                "dagster/row_count": len(items),
                "encoder_id": model.encoder_id,
                "dim": int(model.dim),
                **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
            }
        )

    @asset(
        kinds={"duckdb", "llm"},
        deps=[AssetDep("user_histories", partition_mapping=SAME_DAY), "item_catalog"],
        **per_day,
    )
    def user_anchors(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        encoder: EncoderResource,
        anchor_generator: AnchorGeneratorResource,
        engine: EngineResource,
    ) -> MaterializeResult:
        """K interest anchors per user with a request on the day, generated from the user's history before
        the day, with their generation log-probability; cached by history + model + prompt."""
        chain = labelling_chain(context, partitions, gpl, warehouse, encoder, anchor_generator, engine)
        days, generator = partition_days(context.partition_keys), chain.generator
        context.log.info("generating anchors with %s for %s", generator.backend, span(days))
        stats = chain.anchors(days, progress=True)
        context.log.info("anchor stats: %s", dict(stats.counters))
        summary = chain.anchor_summary(days)
        return MaterializeResult(
            metadata={
                "dagster/row_count": summary.rows,
                "partition_span": span(days),
                "backend": generator.backend,
                "model_id": generator.model_id,
                "prompt_version": generator.prompt_version or "none",
                "user_days": stats.user_days,
                "cache_hits": stats.cache_hits,
                "cache_misses": stats.cache_misses,
                "fallback_anchor_share": summary.fallback_share,
                "fallback_reasons": table_md(summary.fallback_reasons) if len(summary.fallback_reasons) else "none",
                "counters": table_md(
                    pd.Series(dict(stats.counters), name="value").rename_axis("counter").reset_index()
                ),
                "examples": table_md(summary.examples),
            }
        )

    @asset(
        kinds={"duckdb", "sentence_transformers"},
        deps=[AssetDep("user_anchors", partition_mapping=SAME_DAY)],
        **per_day,
    )
    def anchor_embeddings(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        encoder: EncoderResource,
        anchor_generator: AnchorGeneratorResource,
        engine: EngineResource,
    ) -> MaterializeResult:
        """Anchor vectors from the same frozen encoder as the items."""
        chain = labelling_chain(context, partitions, gpl, warehouse, encoder, anchor_generator, engine)
        days = partition_days(context.partition_keys)
        stats = chain.embeddings(days)
        return MaterializeResult(
            metadata={"dagster/row_count": stats.anchors, "partition_span": span(days), **asdict(stats)}
        )

    @asset(
        kinds={"duckdb", "faiss"},
        deps=[
            AssetDep("anchor_embeddings", partition_mapping=SAME_DAY),
            AssetDep("candidate_events", partition_mapping=SAME_DAY),
            "item_embeddings",
        ],
        **per_day,
    )
    def candidate_similarities(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        encoder: EncoderResource,
        anchor_generator: AnchorGeneratorResource,
        engine: EngineResource,
    ) -> MaterializeResult:
        """For every candidate of the day: max and mean cosine over the user's anchors, and the arg-max
        anchor. Exposed rows feed calibration; unexposed rows get pseudo-labels."""
        chain = labelling_chain(context, partitions, gpl, warehouse, encoder, anchor_generator, engine)
        days = partition_days(context.partition_keys)
        stats = chain.similarities(days)
        return MaterializeResult(
            metadata={"dagster/row_count": stats.candidates, "partition_span": span(days), **asdict(stats)}
        )

    # a day's calibration reads the similarities of calibration.window_days before its refit day
    lookback = calibration_lookback_days(calibration)

    @asset(
        kinds={"sklearn"},
        deps=[
            AssetDep(
                "candidate_similarities",
                partition_mapping=TimeWindowPartitionMapping(start_offset=-lookback, end_offset=-1),
            )
        ],
        **per_day,
    )
    def similarity_calibration(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        encoder: EncoderResource,
        anchor_generator: AnchorGeneratorResource,
        engine: EngineResource,
    ) -> MaterializeResult:
        """Similarity -> probability calibration (Platt or isotonic) serving the day, fitted on exposed
        candidates of earlier days only; refit every N days, stored as a versioned JSON artifact."""
        chain = labelling_chain(context, partitions, gpl, warehouse, encoder, anchor_generator, engine)
        days = partition_days(context.partition_keys)
        table = pd.DataFrame([{**asdict(cal), "day": str(cal.day)} for cal in chain.calibrations(days)])
        missing = table[table["version"] == "none"]["day"].nunique()
        if missing:
            context.log.warning(
                "%d day(s) have no calibration yet (too few exposed candidates before them): their "
                "unexposed candidates get no pseudo-labels",
                missing,
            )
        return MaterializeResult(
            metadata={
                "partition_span": span(days),
                "method": chain.settings.calibration.method,
                "versions": ", ".join(sorted(set(table["version"]) - {"none"})) or "none",
                "days_without_calibration": int(missing),
                "calibrations": table_md(table.drop_duplicates(["version", "pooling"])),
            }
        )

    @asset(
        kinds={"duckdb"},
        deps=[
            AssetDep("candidate_similarities", partition_mapping=SAME_DAY),
            AssetDep("similarity_calibration", partition_mapping=SAME_DAY),
        ],
        **per_day,
    )
    def pseudo_labels(
        context: AssetExecutionContext,
        gpl: GplSettings,
        warehouse: WarehouseResource,
        encoder: EncoderResource,
        anchor_generator: AnchorGeneratorResource,
        engine: EngineResource,
    ) -> MaterializeResult:
        """Pseudo-label and confidence weight for every unexposed candidate of the day (GPL steps 3-4), with
        the three confidence factors and the versions of LLM, prompt, encoder and calibration. Gated per
        day by the blocking checks pseudo_labels_valid and pseudo_labels_distribution."""
        chain = labelling_chain(context, partitions, gpl, warehouse, encoder, anchor_generator, engine)
        days = partition_days(context.partition_keys)
        # streamed in batches: a bounded sample comes back for the histograms, the statistics cover all rows
        stats = chain.labels(days)
        quantiles, sample = stats.distribution.quantiles, stats.distribution.sample
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats.rows,
                "partition_span": span(days),
                "coverage": stats.coverage,
                "unexposed_candidates": stats.unexposed_candidates,
                **labelling_gaps_metadata(stats.gaps),
                "calibration_versions": ", ".join(stats.calibration_versions) or "none",
                "pseudo_label_mean": stats.distribution.pseudo_label_mean,
                "confidence_mean": stats.distribution.confidence_mean,
                "quantiles": table_md(quantiles.rename_axis("q").reset_index()) if quantiles is not None else "empty",
                "histograms": histogram_md(
                    {"pseudo_label": sample["pseudo_label"].to_numpy(), "confidence": sample["confidence"].to_numpy()},
                    f"pseudo-labels {span(days)} (a sample of {len(sample):,})",
                ),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"pytorch", "duckdb"},
        deps=["item_embeddings"],
        pool=POOL,
        automation_condition=automation.follow_catalog,
    )
    def item_semantic_ids(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource, encoder: EncoderResource
    ) -> MaterializeResult:
        """Semantic IDs of the catalog: an RQ-VAE over the frozen item embeddings gives each item L codes,
        plus a suffix where items share all of them, so that an ID names one item. Versioned by encoder,
        items, config and seed; retrained only when one of them changes."""
        from gpl_platform.pseudo_labels.semantic_ids.store import build_semantic_ids

        settings = gpl.settings()
        meta = build_semantic_ids(
            warehouse.get(), encoder.get().encoder_id, settings.sid.semantic_ids, settings.seed, settings.artifacts_dir
        )
        metrics = meta["metrics"]
        usage = pd.DataFrame(
            {
                "level": range(1, len(metrics["codebook_usage"]) + 1),
                "codes_used_share": metrics["codebook_usage"],
                "perplexity": metrics["codebook_perplexity"],
            }
        )
        return MaterializeResult(
            metadata={
                "dagster/row_count": metrics["n_items"],
                "version": meta["version"],
                "encoder_id": meta["encoder_id"],
                "trained_now": meta["trained"],
                "artifact": MetadataValue.path(meta["artifact_path"]),
                "codebook_size": metrics["codebook_size"],
                "levels": metrics["levels"],
                "reconstruction_relative_error": metrics["reconstruction_relative_error"],
                "reconstruction_cosine": metrics["reconstruction_cosine"],
                "collision_share": metrics["collision_share"],
                "suffix_vocabulary": metrics["suffix_vocabulary"],
                "unique_ids": metrics["unique_ids"],
                "codebook_usage": table_md(usage),
                "config": MetadataValue.json(meta["config"]),
            }
        )

    @asset(
        kinds={"pytorch"},
        deps=[
            "item_semantic_ids",
            AssetDep(
                "candidate_events", partition_mapping=(TimeWindowPartitionMapping(start_offset=-30, end_offset=-1))
            ),
        ],
        **per_day,
    )
    def sid_generator(context: AssetExecutionContext, anchor_generator: AnchorGeneratorResource) -> MaterializeResult:
        """The semantic-ID generator serving the day: a small decoder-only transformer trained on users'
        positive ID sequences of the days before its refit day (every sid.generator.retrain_every_days) to
        predict a day's positives from the days before it, popular items down-sampled in the prompts;
        weights are a versioned artifact with training metrics."""
        days = partition_days(context.partition_keys)
        family = anchor_generator.get("sid")
        rows = []
        for day in days:
            serving = family.for_day(day)
            metrics = serving.trained.metrics if serving.trained else {}
            rows.append(
                {
                    "refit_day": str(serving.refit),
                    "version": serving.model_id,
                    "users": metrics.get("users", 0),
                    "positives": metrics.get("positives", 0),
                    "objective": metrics.get("objective"),
                    "training_targets": metrics.get("training_targets"),
                    "final_train_loss": metrics.get("final_train_loss"),
                    "valid_recall@10": metrics.get("valid_recall@10"),
                    "valid_popularity_recall@10": metrics.get("valid_popularity_recall@10"),
                    "seconds": metrics.get("seconds"),
                }
            )
        table = pd.DataFrame(rows).drop_duplicates("refit_day")
        untrained = table[table["version"] == "none"]
        if len(untrained):
            context.log.warning(
                "%d refit period(s) have too few positives for a generator: their days get history "
                "anchors from the sid backend",
                len(untrained),
            )
        return MaterializeResult(
            metadata={
                "partition_span": span(days),
                "models": table_md(table),
                "serving_models": int((table["version"] != "none").sum()),
                "periods_without_model": len(untrained),
            }
        )

    return [
        item_embeddings,
        user_anchors,
        anchor_embeddings,
        candidate_similarities,
        similarity_calibration,
        pseudo_labels,
        item_semantic_ids,
        sid_generator,
    ]


def labelling_chain(
    context: AssetExecutionContext,
    partitions: DailyPartitionsDefinition,
    gpl: GplSettings,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    anchor_generator: AnchorGeneratorResource,
    engine: EngineResource,
    backend: str | None = None,
    tables: StageTables = MAIN,
) -> LabellingChain:
    """The labelling chain of a run's resources (``backend``: another anchor backend than the configured one,
    written to ``tables``), its partitions recorded with the run's id."""
    return LabellingChain.build(
        gpl.settings(),
        warehouse.get(),
        engine.get(),
        anchor_generator.get(backend),
        encoder.get(),
        first_day(partitions),
        tables=tables,
        run_id=context.run.run_id,
    )


def labelling_gaps_metadata(gaps: LabelGaps) -> dict:
    """Who got no pseudo-labels and why: users without history (by the no-history rule), days without
    a calibration yet, days whose calibration carries no ranking."""
    degenerate = gaps.days_with_degenerate_calibration
    return {
        "no_history_rule": gaps.no_history_rule,
        "no_history_candidates": gaps.no_history_candidates,
        "no_history_user_days": gaps.no_history_user_days,
        "no_history_labelled": gaps.no_history_labelled,
        "days_without_calibration": len(gaps.days_without_calibration),
        "days_with_degenerate_calibration": len(degenerate),
        "degenerate_days": table_md(pd.DataFrame({"day": list(degenerate), "reason": list(degenerate.values())}))
        if degenerate
        else "none",
    }
