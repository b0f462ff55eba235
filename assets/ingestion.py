"""Ingestion assets: catalog, users, per-day candidate events, per-day user histories."""


from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    TimeWindowPartitionMapping,
    AssetDep,
    asset,
)

from assets.metadata import span, table_md
from assets.partitions import daily_partitions, first_partition_day, partition_days
from assets.resources import GplSettings
from gpl_platform import ingest
from gpl_platform.sources import load_source

GROUP = "ingestion"


@asset(group_name=GROUP, kinds={"duckdb"}, description="Item catalog (contract `items`): id, text and attributes.")
def item_catalog(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    settings = gpl.settings()
    dataset = load_source(settings)
    stats = ingest.ingest_catalog(gpl.warehouse(), dataset, settings.source_signature())
    context.log.info("catalog of %s: %d items, %d users", dataset.name, stats["n_items"], stats["n_users"])
    return MaterializeResult(metadata={
        "dagster/row_count": stats["n_items"], "source": dataset.name,
        "median_text_chars": stats["text_chars_median"], "columns": ", ".join(stats["item_columns"]),
        "preview": table_md(dataset.items.head(8)),
    })


@asset(group_name=GROUP, kinds={"duckdb"}, deps=[item_catalog],
       description="Users (contract `users`): id and attributes. Written with the catalog in one transaction.")
def users(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    dataset = load_source(gpl.settings())
    frame = gpl.warehouse().query("SELECT count(*) AS n FROM users")
    return MaterializeResult(metadata={
        "dagster/row_count": int(frame["n"].iloc[0]), "columns": ", ".join(dataset.users.columns),
        "preview": table_md(dataset.users.head(8)),
    })


@asset(group_name=GROUP, kinds={"duckdb"}, partitions_def=daily_partitions, deps=[item_catalog, users],
       backfill_policy=BackfillPolicy.single_run(),
       description="Recalled candidates of each request of the day: exposed ones with click labels; "
                   "oracle labels (benchmark only) go to a separate table that training never reads.")
def candidate_events(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    settings = gpl.settings()
    days = partition_days(context.partition_keys)
    dataset = load_source(settings)
    stats = ingest.ingest_event_days(gpl.warehouse(), dataset, days, settings.source_signature(), context.run_id)
    empty = int((stats["events"] == 0).sum())
    if empty:
        context.log.warning("%d of %d day(s) have no events (written as empty partitions)", empty, len(days))
    total = stats["events"].sum()
    return MaterializeResult(metadata={
        "dagster/row_count": int(total), "partition_span": span(days), "requests": int(stats["requests"].sum()),
        "exposure_rate": float((stats["exposure_rate"] * stats["events"]).sum() / total) if total else 0.0,
        "ctr_exposed": float(stats["ctr_exposed"].mean()) if total else 0.0,
        "empty_days": empty, "per_day": table_md(stats.reset_index()),
    })


@asset(group_name=GROUP, kinds={"duckdb"}, partitions_def=daily_partitions,
       deps=[AssetDep(candidate_events, partition_mapping=TimeWindowPartitionMapping(start_offset=-1, end_offset=0))],
       backfill_policy=BackfillPolicy.single_run(),
       description="Per user with a request on day D: clicked items strictly before D (UTC), most recent first.")
def user_histories(context: AssetExecutionContext, gpl: GplSettings) -> MaterializeResult:
    settings = gpl.settings()
    days = partition_days(context.partition_keys)
    histories = ingest.build_user_histories(gpl.warehouse(), days, first_partition_day(), settings.history_max_len,
                                            context.run_id)
    stats = ingest.history_day_stats(histories, days)
    return MaterializeResult(metadata={
        "dagster/row_count": len(histories), "partition_span": span(days),
        "cold_start_users": int(stats["cold_start_users"].sum()),
        "median_history_len": float(histories["n_positives"].clip(upper=settings.history_max_len).median())
        if len(histories) else 0.0,
        "per_day": table_md(stats.reset_index()),
    })
