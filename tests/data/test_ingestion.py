import hashlib
from datetime import date

import pandas as pd
import pytest

from gpl_platform.data import ingestion
from gpl_platform.data.contract import ContractError, validate_dataset
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse
from tests.helpers import tiny_contract_tables


def _histories(wh: Warehouse) -> pd.DataFrame:
    frame = wh.query("SELECT * FROM user_histories ORDER BY day, user_id")
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    frame["history_item_ids"] = frame["history_item_ids"].map(list)
    return frame


def _dataset(events=None):
    items, users, base = tiny_contract_tables()
    return validate_dataset("tiny", items, users, base if events is None else events)


def test_histories_use_only_clicks_strictly_before_the_utc_day(tmp_path):
    """r1 at 2024-03-01T23:59:59Z is before day 03-02; r2 at 03-02T00:00:00Z is not before itself."""
    items, users, events = tiny_contract_tables()
    # A third request on 03-03 sees both days' clicks.
    extra = events.iloc[[0]].assign(
        request_id="r3", item_id="b", event_time=pd.Timestamp("2024-03-03T08:00:00Z"), exposed=False, clicked=pd.NA
    )
    extra["event_time"] = extra["event_time"].astype("datetime64[us, UTC]")
    ds = validate_dataset(
        "tiny", items, users, pd.concat([events, extra.astype(events.dtypes.to_dict())], ignore_index=True)
    )
    wh = Warehouse(tmp_path / "w.duckdb")
    days = [date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)]
    ingestion.ingest_event_days(wh, ds, days, {"source": "tiny"})
    stats = ingestion.build_user_histories(wh, days, days[0], max_len=10)
    assert stats["users"].tolist() == [1, 1, 1] and stats["cold_start_users"].tolist() == [1, 0, 0]
    h = _histories(wh).set_index("day")
    assert h.loc[date(2024, 3, 1), "history_item_ids"] == []  # nothing before the first day
    assert h.loc[date(2024, 3, 2), "history_item_ids"] == ["a"]  # r1's click at 23:59:59 on 03-01
    # On 03-03: a was clicked again on 03-02 (latest click counts once); b was not clicked.
    assert h.loc[date(2024, 3, 3), "history_item_ids"] == ["a"]
    assert h.loc[date(2024, 3, 3), "n_positives"] == 1


def test_history_order_and_length_cap(tmp_path, settings):
    from gpl_platform.data.sources import load_source

    ds = load_source(settings)
    wh = Warehouse(settings.warehouse)
    days = sorted(set(ds.events["day"]))
    ingestion.ingest_event_days(wh, ds, days, settings.source_signature())
    stats = ingestion.build_user_histories(wh, days[-1:], days[0], max_len=3)
    h = _histories(wh)
    assert stats.loc[days[-1], "users"] == len(h) == ds.events.loc[ds.events["day"] == days[-1], "user_id"].nunique()
    assert h["history_item_ids"].map(len).max() <= 3
    # the anchor cache's key, computed in SQL, is sha256 of the ids joined by the unit separator
    for ids, key in zip(h["history_item_ids"], h["history_hash"]):
        assert key == hashlib.sha256("\x1f".join(ids).encode()).hexdigest()[:16]
    assert h["history_hash"].nunique() == h["history_item_ids"].map(tuple).nunique()
    row = h[h["n_positives"] > 3].iloc[0]
    clicks = ds.events[
        (ds.events["user_id"] == row["user_id"]) & (ds.events["clicked"] == 1) & (ds.events["day"] < days[-1])
    ]
    latest = clicks.sort_values(["event_time", "item_id"], ascending=[False, True]).drop_duplicates("item_id")
    assert list(row["history_item_ids"]) == latest["item_id"].head(3).tolist()
    assert row["n_positives"] == len(latest)


def test_histories_refuse_missing_earlier_days(tmp_path):
    ds = _dataset()
    wh = Warehouse(tmp_path / "w.duckdb")
    ingestion.ingest_event_days(wh, ds, [date(2024, 3, 2)], {"source": "tiny"})
    with pytest.raises(MissingUpstreamDays, match="first: 2024-03-01"):
        ingestion.build_user_histories(wh, [date(2024, 3, 2)], date(2024, 3, 1), max_len=10)


def test_event_stats_cover_empty_days(tmp_path):
    ds = _dataset()
    stats = ingestion.ingest_event_days(
        Warehouse(tmp_path / "w.duckdb"), ds, [date(2024, 3, 1), date(2024, 3, 5)], {"source": "tiny"}
    )
    assert stats.index.tolist() == [date(2024, 3, 1), date(2024, 3, 5)]
    assert stats.loc[date(2024, 3, 5), "events"] == 0
    assert stats.loc[date(2024, 3, 1), "exposure_rate"] == pytest.approx(2 / 3)


def test_a_day_ingested_in_chunks_equals_the_day_ingested_whole_and_a_failing_chunk_keeps_the_day(tmp_path, settings):
    from gpl_platform.data.sources import load_source

    ds = load_source(settings)
    day = sorted(set(ds.events["day"]))[1]
    events = ds.events[ds.events["day"] == day]
    whole, chunked = Warehouse(tmp_path / "whole.duckdb"), Warehouse(tmp_path / "chunked.duckdb")
    want = ingestion.ingest_event_days(whole, ds, [day], {"source": "sim"})
    by_request = events["request_id"].str[1:].astype(int) % 4
    got = ingestion.ingest_event_day_chunks(
        chunked, day, (events[by_request == k] for k in range(4)), {"source": "sim"}
    )
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    for table in ("events", "oracle_labels", "partitions"):
        columns = "* EXCLUDE (written_at)" if table == "partitions" else "*"
        a, b = (w.query(f"SELECT {columns} FROM {table} ORDER BY ALL") for w in (whole, chunked))
        pd.testing.assert_frame_equal(a, b, obj=table)

    def failing():
        yield events[by_request == 0]
        raise ContractError("events/day=x/part-0.parquet", "item_id", 1, "name items missing from the items table")

    before = chunked.query("SELECT * FROM events ORDER BY ALL")
    with pytest.raises(ContractError):
        ingestion.ingest_event_day_chunks(chunked, day, failing(), {"source": "sim"})
    pd.testing.assert_frame_equal(before, chunked.query("SELECT * FROM events ORDER BY ALL"))
