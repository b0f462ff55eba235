"""The steps the Dagster feature assets run: read the warehouse, compute, write parquet sources."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import pandas as pd

from gpl_platform.config import Settings
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.features import compute, parquet
from gpl_platform.features.schema import FeatureSpec
from gpl_platform.features.store import sources_dir


def warehouse_spec(warehouse: Warehouse) -> FeatureSpec:
    with warehouse.connect(read_only=True) as con:
        return compute.spec_from_warehouse(con)


def _check_events(warehouse: Warehouse, days: Sequence[date], first_day: date, what: str) -> None:
    missing = sorted(compute.previous_days(days, first_day) - warehouse.written_days("events"))
    if missing:
        raise MissingUpstreamDays(
            f"{what} for {min(days)}..{max(days)} need the events of every earlier day, but {len(missing)} "
            f"day(s) are not ingested (first: {missing[0]}, last: {missing[-1]}). "
            "Materialize candidate_events for those partitions first."
        )


def _per_day(counts: dict[date, int], name: str) -> pd.DataFrame:
    return pd.DataFrame({"day": list(counts), name: list(counts.values())})


def write_user_features(settings: Settings, warehouse: Warehouse, days: Sequence[date], first_day: date) -> dict:
    """user_activity (snapshot) and user_history (sparse) parquet files of ``days``, one day at a time and each
    day streamed from DuckDB in chunks of users (``streaming.batch_candidates`` activity rows,
    ``streaming.encode_batch_texts`` history vectors): a day's users are the size of the traffic, a chunk is not."""
    _check_events(warehouse, days, first_day, "user features")
    spec = warehouse_spec(warehouse)
    views = spec.views()
    out = sources_dir(settings)
    n_act: dict[date, int] = {}
    n_hist: dict[date, int] = {}
    totals = {"rate_sum": 0.0, "rated": 0, "cold": 0}

    def tallied(chunks):
        for activity in chunks:
            totals["rate_sum"] += float(activity["user_click_rate"].sum())
            totals["rated"] += int(activity["user_click_rate"].notna().sum())
            totals["cold"] += int((activity["user_exposures"] == 0).sum())
            yield activity

    with warehouse.connect(read_only=True) as con:
        vectors = compute.load_content_vectors(con, spec.embedding_dim)
        for day in sorted(set(days)):
            activity = compute.user_activity_chunks(con, [day], settings.streaming.batch_candidates)
            n_act[day] = parquet.write_day_chunks(
                tallied(activity), out, "user_activity", "user_id", views["user_activity"]["features"], day
            )
            history = compute.user_history_chunks(
                con, [day], settings.history_max_len, vectors, spec.embedding_dim, settings.streaming.encode_batch_texts
            )
            n_hist[day] = parquet.write_day_chunks(
                history, out, "user_history", "user_id", views["user_history"]["features"], day
            )
    per_day = _per_day(n_act, "user_activity_rows").merge(_per_day(n_hist, "user_history_rows"), on="day")
    users = sum(n_act.values())
    return {
        "rows": int(users + sum(n_hist.values())),
        "per_day": per_day,
        "has_item_embeddings": bool(vectors),
        "mean_click_rate": totals["rate_sum"] / totals["rated"] if totals["rated"] else 0.0,
        "cold_users_share": totals["cold"] / users if users else 0.0,
    }


def write_item_features(settings: Settings, warehouse: Warehouse, days: Sequence[date], first_day: date) -> dict:
    """item_activity (snapshot) parquet files of ``days``."""
    _check_events(warehouse, days, first_day, "item features")
    spec = warehouse_spec(warehouse)
    with warehouse.connect(read_only=True) as con:
        activity = compute.compute_item_activity(con, days)
    counts = parquet.write_day_partitions(
        activity, sources_dir(settings), "item_activity", "item_id", spec.views()["item_activity"]["features"], days
    )
    return {"rows": int(sum(counts.values())), "per_day": _per_day(counts, "item_activity_rows"), "activity": activity}


def write_profile_features(settings: Settings, warehouse: Warehouse) -> dict:
    """Static user_profile and item_profile files (attributes, item content embedding)."""
    spec = warehouse_spec(warehouse)
    views = spec.views()
    with warehouse.connect(read_only=True) as con:
        vectors = compute.load_content_vectors(con, spec.embedding_dim)
        users = compute.compute_user_profile(con, spec)
        items = compute.compute_item_profile(con, spec, vectors)
    out = sources_dir(settings)
    parquet.write_static(users, out, "user_profile", "user_id", views["user_profile"]["features"])
    parquet.write_static(items, out, "item_profile", "item_id", views["item_profile"]["features"])
    return {
        "users": len(users),
        "items": len(items),
        "items_with_embedding": int(items["item_has_content_emb"].sum()),
        "spec": spec,
    }
