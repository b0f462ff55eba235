"""Feature store assets (group ``features``): per-day feature parquet (the Feast offline sources), the
Feast registry (apply when definitions change) and the online store (materialize the partitions'
time windows).

    item_catalog, users, item_embeddings ──► profile_features ──────────────┐
    item_catalog, users ──► feast_registry ──────────────────────────────────┤
    candidate_events[< D], item_embeddings ──► user_features[D] ─────────────┼──► online_features[D]
    candidate_events[< D] ──► item_features[D] ──────────────────────────────┘

A feature row of day D uses only events before D and is stamped D 00:00 UTC; re-running a day
rewrites its files whole and re-materializes, so it is idempotent.
"""

import warnings

import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    BackfillPolicy,
    DailyPartitionsDefinition,
    MaterializeResult,
    TimeWindowPartitionMapping,
    asset,
)

from assets.automation import Automation
from assets.ingestion import POOL
from assets.metadata import span, table_md
from assets.partitions import first_day, partition_days
from assets.resources import FeatureStoreResource, GplSettings, WarehouseResource

GROUP = "features"


def _events_before_day() -> AssetDep:
    """Day D reads the events of the days before D (the first day has none: allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_nonexistent_upstream_partitions is "beta"
        return AssetDep(
            "candidate_events",
            partition_mapping=TimeWindowPartitionMapping(
                start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True
            ),
        )


def feature_assets(partitions: DailyPartitionsDefinition, automation: Automation) -> list:
    per_day = {
        "partitions_def": partitions,
        "backfill_policy": BackfillPolicy.single_run(),
        "pool": POOL,
        "automation_condition": automation.follow_upstream,
        "group_name": GROUP,
    }

    @asset(
        group_name=GROUP,
        kinds={"feast", "parquet"},
        deps=["item_catalog", "users", "item_embeddings"],
        pool=POOL,
        automation_condition=automation.follow_catalog,
    )
    def profile_features(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Static user_profile and item_profile sources: attributes and item content embeddings."""
        from gpl_platform.features import pipeline

        stats = pipeline.write_profile_features(gpl.settings(), warehouse.get())
        if stats["items_with_embedding"] < stats["items"]:
            context.log.warning(
                "%d of %d items have no content embedding (zeros, i_has_content_emb=0)",
                stats["items"] - stats["items_with_embedding"],
                stats["items"],
            )
        spec = stats["spec"]
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats["users"] + stats["items"],
                "users": stats["users"],
                "items": stats["items"],
                "items_with_embedding": stats["items_with_embedding"],
                "user_attributes": ", ".join(spec.user_attributes) or "-",
                "item_attributes": ", ".join(spec.item_attributes) or "-",
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"feast"},
        deps=["item_catalog", "users"],
        pool=POOL,
        automation_condition=automation.follow_catalog,
    )
    def feast_registry(
        context: AssetExecutionContext, warehouse: WarehouseResource, feature_store: FeatureStoreResource
    ) -> MaterializeResult:
        """Feast registry: `feast apply` of entities, sources, views and versioned feature services, only
        when the definitions (spec, code, config) changed."""
        from gpl_platform.features import pipeline

        spec = pipeline.warehouse_spec(warehouse.get())
        result = feature_store.get().apply_if_changed(spec)
        context.log.info(
            "feast apply %s (digest %s)", "ran" if result["applied"] else "skipped: unchanged", result["digest"][:12]
        )
        views = pd.DataFrame(
            [
                {"view": v, "entity": i["entity"], "kind": i["kind"], "features": ", ".join(i["features"])}
                for v, i in spec.views().items()
            ]
        )
        return MaterializeResult(
            metadata={
                "applied": result["applied"],
                "definitions_digest": result["digest"][:16],
                "objects": ", ".join(result["objects"]),
                "removed": ", ".join(result.get("removed", [])) or "-",
                "views": table_md(views),
            }
        )

    @asset(kinds={"duckdb", "parquet"}, deps=[_events_before_day(), "users", "item_embeddings"], **per_day)
    def user_features(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Per day D, from events before D: user_activity snapshot (every user) and user_history
        (recent-click embedding, for users whose history changed on D-1)."""
        from gpl_platform.features import pipeline

        days = partition_days(context.partition_keys)
        stats = pipeline.write_user_features(gpl.settings(), warehouse.get(), days, first_day(partitions))
        if not stats["has_item_embeddings"]:
            context.log.warning("no item_embeddings table: history embeddings are zeros (u_history_emb_n=0)")
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats["rows"],
                "partition_span": span(days),
                "mean_click_rate": float(stats["mean_click_rate"]),
                "cold_users_share": float(stats["cold_users_share"]),
                "per_day": table_md(stats["per_day"]),
            }
        )

    @asset(kinds={"duckdb", "parquet"}, deps=[_events_before_day(), "item_catalog"], **per_day)
    def item_features(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Per day D, from events before D: item_activity snapshot (exposures, clicks, CTR, popularity
        bucket, long-tail flag) of every catalog item."""
        from gpl_platform.features import pipeline

        days = partition_days(context.partition_keys)
        stats = pipeline.write_item_features(gpl.settings(), warehouse.get(), days, first_day(partitions))
        act = stats["activity"]
        last = act[act["day"] == max(days)]
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats["rows"],
                "partition_span": span(days),
                "long_tail_share_last_day": float(last["item_long_tail"].mean()) if len(last) else 0.0,
                "never_exposed_share_last_day": float((last["item_exposures"] == 0).mean()) if len(last) else 0.0,
                "per_day": table_md(stats["per_day"]),
            }
        )

    @asset(
        kinds={"feast", "sqlite"},
        deps=["feast_registry", "profile_features", "user_features", "item_features"],
        **per_day,
    )
    def online_features(
        context: AssetExecutionContext, warehouse: WarehouseResource, feature_store: FeatureStoreResource
    ) -> MaterializeResult:
        """Online store: Feast materialize(start, end) over the partitions' time windows (ending on the
        newest feature day, so re-running an old day keeps the newest values)."""
        from gpl_platform.features import pipeline

        days = partition_days(context.partition_keys)
        store = feature_store.get()
        # A per-day run never runs the unpartitioned feast_registry: make sure the registry matches the
        # definitions first (a no-op when the digest is unchanged).
        store.apply_if_changed(pipeline.warehouse_spec(warehouse.get()))
        windows = store.materialize_days(days)
        return MaterializeResult(
            metadata={
                "partition_span": span(days),
                "window_end": windows["end"],
                "windows": ", ".join(f"{s}: {'+'.join(v)}" for s, v in windows["windows"].items()),
            }
        )

    return [profile_features, feast_registry, user_features, item_features, online_features]
