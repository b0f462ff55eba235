"""Feature computation from the warehouse: point-in-time semantics, values, parquet types (no Feast)."""

from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.features import compute, parquet, pipeline
from gpl_platform.features.schema import FeatureSpec
from gpl_platform.features.store import sources_dir
from tests.helpers import RandomEncoder

D1, D2, D3 = date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)


def _events(rows):
    frame = pd.DataFrame(rows, columns=["day", "request_id", "user_id", "item_id", "event_time", "exposed", "clicked"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True, format="ISO8601").astype("datetime64[us, UTC]")
    frame["clicked"] = frame["clicked"].astype("Int8")
    frame["propensity"] = float("nan")  # no logging propensities in these hand-written logs
    frame["logging_policy"] = "production"
    return frame


@pytest.fixture
def tiny(settings):
    """u1 clicks a on D1 and c on D2; u2 only sees b; item d never appears; u3 never shows up."""
    wh = Warehouse(settings.warehouse)
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "text": ["A", "B", "C", "D"],
            "genre": ["x", "y", "x", None],
            "year": [1990, 1991, None, 1993],
        }
    )
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "age": [30, 40, 50], "country": ["FR", "DE", "FR"]})
    events = _events(
        [
            (D1, "r1", "u1", "a", "2024-03-01T10:00Z", True, 1),
            (D1, "r1", "u1", "b", "2024-03-01T10:00Z", True, 0),
            (D1, "r1", "u1", "c", "2024-03-01T10:00Z", False, None),
            (D1, "r2", "u2", "b", "2024-03-01T23:59:59Z", True, 0),
            (D2, "r3", "u1", "c", "2024-03-02T00:00:00Z", True, 1),
            (D2, "r3", "u1", "b", "2024-03-02T00:00:00Z", True, 0),
        ]
    )
    with wh.transaction() as con:
        wh.replace_table("items", items, con)
        wh.replace_table("users", users, con)
        wh.replace_partitions("events", events, [D1, D2, D3], con)
    enc = RandomEncoder(dim=8)
    vectors = dict(zip(items["item_id"], enc.encode(items["text"].tolist())))
    return wh, vectors


def _by(frame, key, day):
    return frame[frame["day"] == day].set_index(key)


def test_user_activity_uses_only_events_before_the_day(tiny):
    wh, _ = tiny
    with wh.connect(read_only=True) as con:
        act = compute.compute_user_activity(con, [D1, D2, D3])
    assert len(act) == 3 * 3  # every catalog user, every day
    d1, d2, d3 = (_by(act, "user_id", d) for d in (D1, D2, D3))
    assert (d1[["user_requests", "user_exposures", "user_clicks"]] == 0).all().all()  # nothing before D1
    assert d1.loc["u1", "user_days_since_last_request"] == -1
    assert d2.loc["u1", ["user_requests", "user_exposures", "user_clicks"]].tolist() == [1, 2, 1]
    assert d2.loc["u1", "user_click_rate"] == 0.5 and d2.loc["u1", "user_days_since_last_request"] == 1
    assert d2.loc["u2", ["user_exposures", "user_clicks"]].tolist() == [1, 0]  # 23:59:59 of D1 counts for D2
    assert d3.loc["u1", ["user_requests", "user_exposures", "user_clicks", "user_active_days"]].tolist() == [2, 4, 2, 2]
    # smoothed towards the global CTR before the day (D2: 1 click / 3 exposures)
    assert d2.loc["u3", "user_click_rate_smoothed"] == pytest.approx(1 / 3)
    assert d2.loc["u1", "user_click_rate_smoothed"] == pytest.approx((1 + 10 / 3) / (2 + 10))
    ts = act.loc[act["day"] == D2, "event_timestamp"].iloc[0]
    assert ts == pd.Timestamp("2024-03-02T00:00:00Z") and str(act["event_timestamp"].dtype) == "datetime64[us, UTC]"


def test_changing_a_days_events_does_not_change_that_days_features(tiny):
    wh, _ = tiny
    with wh.connect(read_only=True) as con:
        before = compute.compute_item_activity(con, [D2])
    with wh.transaction() as con:
        extra = _events([(D2, "r9", "u2", "d", "2024-03-02T05:00Z", True, 1)])
        wh.replace_partitions("events", extra, [D2], con)
    with wh.connect(read_only=True) as con:
        after = compute.compute_item_activity(con, [D2, D3])
    pd.testing.assert_frame_equal(before, after[after["day"] == D2].reset_index(drop=True))
    assert _by(after, "item_id", D3).loc["d", "item_clicks"] == 1


def test_item_activity_popularity_and_long_tail(tiny):
    wh, _ = tiny
    with wh.connect(read_only=True) as con:
        act = compute.compute_item_activity(con, [D1, D3])
    d1, d3 = _by(act, "item_id", D1), _by(act, "item_id", D3)
    assert (d1["item_long_tail"] == 1).all() and (d1["item_popularity_bucket"] == 0).all()
    assert d3.loc["b", ["item_candidates", "item_exposures", "item_clicks"]].tolist() == [3, 3, 0]
    assert d3.loc["c", ["item_candidates", "item_exposures", "item_clicks", "item_ctr"]].tolist() == [2, 1, 1, 1.0]
    # exposures before D3: b 3, a 1, c 1, d 0 (total 5): the head holding 80% is {b, a}
    assert d3["item_long_tail"].to_dict() == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert d3.loc["b", "item_popularity_bucket"] == 9 and d3.loc["d", "item_popularity_bucket"] == 0


def test_user_history_is_sparse_and_point_in_time(tiny):
    wh, vectors = tiny
    with wh.connect(read_only=True) as con:
        hist = compute.compute_user_history(con, [D1, D2, D3], max_len=10, vectors=vectors, dim=8)
    # only users who clicked the day before get a row: u1 on D2 (clicked a on D1) and D3 (clicked c on D2)
    assert list(zip(hist["day"], hist["user_id"])) == [(D2, "u1"), (D3, "u1")]
    d2, d3 = hist.iloc[0], hist.iloc[1]
    np.testing.assert_allclose(d2["user_history_emb"], vectors["a"], rtol=1e-6)
    mean = (vectors["a"].astype(np.float64) + vectors["c"]) / 2
    np.testing.assert_allclose(d3["user_history_emb"], mean / np.linalg.norm(mean), rtol=1e-5)
    assert d3["user_history_emb"].dtype == np.float32 and d3["user_history_emb_n"] == 2
    with wh.connect(read_only=True) as con:  # max_len keeps the most recent clicks
        short = compute.compute_user_history(con, [D3], max_len=1, vectors=vectors, dim=8)
    np.testing.assert_allclose(short.iloc[0]["user_history_emb"], vectors["c"], rtol=1e-6)


def test_spec_and_profiles_follow_the_source_columns(tiny):
    wh, vectors = tiny
    with wh.connect(read_only=True) as con:
        spec = compute.spec_from_warehouse(con)
        profile = compute.compute_item_profile(con, spec, {k: v for k, v in vectors.items() if k != "d"})
    assert spec.user_attributes == {"user_num_age": ("age", "Float64"), "user_cat_country": ("country", "String")}
    assert spec.item_attributes == {"item_cat_genre": ("genre", "String"), "item_num_year": ("year", "Float64")}
    assert FeatureSpec.from_json(spec.to_json()) == spec
    row = profile.set_index("item_id").loc["d"]
    assert row["item_has_content_emb"] == 0 and not np.any(row["item_content_emb"]) and row["item_cat_genre"] is None
    assert (
        row["item_known"] == 1
        and profile.set_index("item_id").loc["c", "item_num_year"]
        != profile.set_index("item_id").loc["c", "item_num_year"]
    )  # a null year stays null: Feast fills the default


def test_parquet_files_have_feast_types_and_reruns_replace_them(tiny, settings):
    wh, _ = tiny
    first = pipeline.write_item_features(settings, wh, [D2, D3], D1)
    pipeline.write_user_features(settings, wh, [D1, D2, D3], D1)
    out = sources_dir(settings)
    files = sorted(p.name for p in (out / "item_activity").iterdir())
    assert files == ["2024-03-02.parquet", "2024-03-03.parquet"]  # no temp files left
    schema = pq.read_schema(out / "user_history" / "2024-03-01.parquet")  # empty day: schema only
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("user_history_emb").type == pa.list_(pa.float32())
    assert pq.read_metadata(out / "user_history" / "2024-03-01.parquet").num_rows == 0
    again = pipeline.write_item_features(settings, wh, [D3], D1)
    assert pq.read_table(out / "item_activity" / "2024-03-03.parquet").equals(
        parquet.to_arrow(
            first["activity"][first["activity"]["day"] == D3],
            "item_id",
            FeatureSpec().views()["item_activity"]["features"],
        )
    )
    assert again["rows"] == 4 and parquet.written_days(out, "item_activity") == {D2, D3}


def test_missing_earlier_event_days_fail_clearly(settings):
    wh = Warehouse(settings.warehouse)
    with wh.transaction() as con:
        wh.replace_table("items", pd.DataFrame({"item_id": ["a"], "text": ["A"]}), con)
        wh.replace_table("users", pd.DataFrame({"user_id": ["u1"]}), con)
        wh.replace_partitions("events", _events([]), [D2], con)
    with pytest.raises(MissingUpstreamDays, match="2024-03-01"):
        pipeline.write_item_features(settings, wh, [D3], D1)


def test_user_features_streamed_in_small_chunks_write_the_files_of_one_chunk(settings, tmp_path):
    """write_user_features streams each day's users from DuckDB in chunks (streaming.batch_candidates activity
    rows, streaming.encode_batch_texts history vectors): with chunks of 7 and 3 users the files hold exactly
    the rows of one chunk per day."""
    from gpl_platform.config import load_settings
    from gpl_platform.data import ingestion
    from gpl_platform.data.sources import load_source
    from gpl_platform.pseudo_labels.encoder import update_item_embeddings

    dataset = load_source(settings)
    wh = Warehouse(settings.warehouse)
    ingestion.ingest_catalog(wh, dataset, settings.source_signature())
    days = sorted(set(dataset.events["day"]))
    ingestion.ingest_event_days(wh, dataset, days, settings.source_signature())
    with wh.connect() as con:
        update_item_embeddings(con, dataset.items[["item_id", "text"]], RandomEncoder())
    outputs = {}
    for name, streaming in (
        ("one", {"batch_candidates": 10**6, "encode_batch_texts": 10**6}),
        ("small", {"batch_candidates": 7, "encode_batch_texts": 3}),
    ):
        run = load_settings({"data_dir": str(tmp_path / name), "streaming": streaming})
        stats = pipeline.write_user_features(run, wh, days, days[0])
        outputs[name] = (stats, sources_dir(run))
    (one, one_dir), (small, small_dir) = outputs["one"], outputs["small"]
    assert small["rows"] == one["rows"] > 0 and small["mean_click_rate"] == pytest.approx(one["mean_click_rate"])
    for view in ("user_activity", "user_history"):
        for day in days:
            a = pq.read_table(parquet.view_dir(one_dir, view) / f"{day.isoformat()}.parquet")
            b = pq.read_table(parquet.view_dir(small_dir, view) / f"{day.isoformat()}.parquet")
            assert a.equals(b), (view, day)
            if view == "user_activity":
                assert (
                    pq.ParquetFile(parquet.view_dir(small_dir, view) / f"{day.isoformat()}.parquet").num_row_groups > 1
                )
    assert pq.read_table(parquet.view_dir(small_dir, "user_history")).num_rows > 3  # several history chunks
