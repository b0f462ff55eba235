"""Ingestion assets (group ``ingestion``): catalog, users, per-day candidate events, per-day user histories."""

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
from assets.metadata import span, table_md
from assets.partitions import first_day, partition_days
from assets.resources import GplSettings, WarehouseResource
from gpl_platform.data import ingestion
from gpl_platform.data.delivery import event_day_folders
from gpl_platform.data.delivery_chunks import delivered_item_ids
from gpl_platform.data.sources import delivered_day_events, load_source

GROUP = "ingestion"
POOL = "duckdb_warehouse"  # DuckDB allows one writing process: every asset that opens the file is in it


def ingestion_assets(partitions: DailyPartitionsDefinition, automation: Automation) -> list:
    @asset(group_name=GROUP, kinds={"duckdb"}, pool=POOL)
    def item_catalog(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Item catalog (contract `items`): id, text and attributes; the users table is written with it
        in one transaction."""
        settings = gpl.settings()
        dataset = load_source(settings, days=[])
        by_day = _by_day(settings)
        delivered = delivered_item_ids(settings.contract.path, settings.streaming.duckdb_memory_limit) if by_day else ()
        stats = ingestion.ingest_catalog(warehouse.get(), dataset, settings.source_signature(), delivered)
        context.log.info("catalog of %s: %d items, %d users", dataset.name, stats["n_items"], stats["n_users"])
        return MaterializeResult(
            metadata={
                "dagster/row_count": stats["n_items"],
                "source": dataset.name,
                "median_text_chars": stats["text_chars_median"],
                "columns": ", ".join(stats["item_columns"]),
                "preview": table_md(dataset.items.head(8)),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"duckdb"},
        deps=["item_catalog"],
        pool=POOL,
        automation_condition=automation.follow_catalog,
    )
    def users(context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource) -> MaterializeResult:
        """Users (contract `users`): id and attributes. Written with the catalog in one transaction."""
        dataset = load_source(gpl.settings(), days=[])
        frame = warehouse.get().query("SELECT count(*) AS n FROM users")
        return MaterializeResult(
            metadata={
                "dagster/row_count": int(frame["n"].iloc[0]),
                "columns": ", ".join(dataset.users.columns),
                "preview": table_md(dataset.users.head(8)),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"duckdb"},
        partitions_def=partitions,
        deps=["item_catalog", "users"],
        backfill_policy=BackfillPolicy.single_run(),
        pool=POOL,
    )
    def candidate_events(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Recalled candidates of each request of the day: exposed ones with click labels; oracle labels
        (benchmark only) go to a separate table that training never reads. A contract delivered by day
        folders reads only the run's days, one day at a time, and each day in chunks of whole requests
        (``streaming.batch_candidates`` rows) validated and written in that day's one transaction: a backfill's
        memory is a chunk's, not a day's or the range's. A day that was delivered before and is missing
        from the delivery now follows ``contract.missing_days`` (keep its rows, or clear it)."""
        settings = gpl.settings()
        wh = warehouse.get()
        days = partition_days(context.partition_keys)
        by_day = _by_day(settings)
        dataset = None if by_day else load_source(settings, days=days)
        delivered = _delivered_days(settings, dataset)
        vanished = sorted((set(days) - delivered) & ingestion.nonempty_event_days(wh)) if delivered is not None else []
        kept = vanished if settings.contract.missing_days == "keep" else []
        for day in vanished:
            context.log.warning(
                "%s was delivered before and is missing from the delivery now: %s (contract.missing_days=%s)",
                day,
                "its rows are kept" if kept else "cleared",
                settings.contract.missing_days,
            )
        to_write = [d for d in days if d not in kept]
        signature = settings.source_signature()
        if by_day:  # a day folder holds only its day (validation refuses other rows): nothing lies outside
            # every day validated before any is written: a day the contract refuses leaves the whole range as it was
            stats = ingestion.ingest_delivered_days(
                wh, lambda: delivered_day_events(settings, to_write), signature, context.run.run_id
            )
            outside = []
        else:
            stats = ingestion.ingest_event_days(wh, dataset, to_write, signature, context.run.run_id)
            outside = sorted(d for d in set(dataset.events["day"]) if not partitions.has_partition_key(d.isoformat()))
        if outside:
            context.log.warning(
                "%d day(s) of the source lie outside the partitions (%s .. %s) and are not ingested",
                len(outside),
                outside[0],
                outside[-1],
            )
        stale = sorted(ingestion.nonempty_event_days(wh) - delivered) if delivered is not None else []
        empty = int((stats["events"] == 0).sum())
        if empty:
            context.log.warning("%d of %d day(s) have no events (written as empty partitions)", empty, len(to_write))
        total = stats["events"].sum()
        return MaterializeResult(
            metadata={
                "dagster/row_count": int(total),
                "partition_span": span(days),
                "requests": int(stats["requests"].sum()),
                "exposure_rate": float((stats["exposure_rate"] * stats["events"]).sum() / total) if total else 0.0,
                "ctr_exposed": float(stats["ctr_exposed"].mean()) if total else 0.0,
                "empty_days": empty,
                "per_day": table_md(stats.reset_index()),
                "days_kept_missing_from_delivery": ", ".join(map(str, kept)) or "none",
                "days_no_longer_delivered": ", ".join(map(str, stale)) or "none",
                "source_days_outside_partitions": len(outside),
            }
        )

    @asset(
        group_name=GROUP,
        kinds={"duckdb"},
        partitions_def=partitions,
        pool=POOL,
        deps=[
            AssetDep("candidate_events", partition_mapping=TimeWindowPartitionMapping(start_offset=-1, end_offset=0))
        ],
        backfill_policy=BackfillPolicy.single_run(),
        automation_condition=automation.follow_upstream,
    )
    def user_histories(
        context: AssetExecutionContext, gpl: GplSettings, warehouse: WarehouseResource
    ) -> MaterializeResult:
        """Per user with a request on day D: clicked items strictly before D (UTC), most recent first."""
        settings = gpl.settings()
        days = partition_days(context.partition_keys)
        stats = ingestion.build_user_histories(
            warehouse.get(), days, first_day(partitions), settings.history_max_len, context.run.run_id
        )
        return MaterializeResult(
            metadata={
                "dagster/row_count": int(stats["users"].sum()),
                "partition_span": span(days),
                "cold_start_users": int(stats["cold_start_users"].sum()),
                "per_day": table_md(stats.reset_index()),
            }
        )

    return [item_catalog, users, candidate_events, user_histories]


def _by_day(settings) -> bool:
    return settings.source == "contract" and event_day_folders(settings.contract.path) is not None


def _delivered_days(settings, dataset) -> set | None:
    """Every day the contract delivery holds now (None for the benchmark sources, which cannot lose days)."""
    if settings.source != "contract":
        return None
    folders = event_day_folders(settings.contract.path)
    return set(folders) if folders is not None else set(dataset.events["day"])
