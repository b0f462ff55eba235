"""Every shape the data contract allows runs end to end (ingestion, GPL labels, Feast features and the
online store): users with or without attribute columns or without a users table, items with or
without attributes, string, numeric and boolean attributes with empty cells, CSV or parquet, and
users who appear only in events."""

import json

import numpy as np
import pandas as pd
import pytest

from assets.definitions import LABELLING_ASSETS
from assets.resources import GplSettings
from assets.runner import run_pipeline
from gpl_platform.config import load_settings
from gpl_platform.data.sources import load_source
from gpl_platform.features.store import FeastStore

STAGES = [
    *LABELLING_ASSETS,
    "profile_features",
    "feast_registry",
    "user_features",
    "item_features",
    "online_features",
]
OVERRIDES = {"anchors": {"backend": "history"}, "calibration": {"min_samples": 20}}


def _shape(name: str, dataset):
    """(items, users or None, events, file format) of a contract shape, from the small simulator world."""
    items, users = dataset.items.copy(), dataset.users.copy()
    events = dataset.events.drop(columns=["day"])
    event_users = events["user_id"].drop_duplicates().tolist()
    if name == "no_attributes_csv":  # users: only user_id, and three event users missing; items: id and text only
        return items[["item_id", "text"]], users[["user_id"]][~users["user_id"].isin(event_users[:3])], events, "csv"
    if name == "no_users_table_mixed_item_attributes":
        items["year"] = pd.array([1990 + k % 30 if k % 7 else None for k in range(len(items))], dtype="Int64")
        items["family"] = [bool(k % 2) for k in range(len(items))]
        items.loc[items.index[::5], "topic"] = None
        return items, None, events, "parquet"
    if name == "string_and_numeric_user_attributes":
        users["age"] = users["age"].astype(float)
        users.loc[users.index[::4], "age"] = np.nan
        users.loc[users.index[1::4], "country"] = None
        return items[["item_id", "text", "topic"]], users, events, "parquet"
    raise ValueError(name)


def _write(directory, items, users, events, fmt):
    directory.mkdir(parents=True)
    for name, frame in (("items", items), ("users", users), ("events", events)):
        if frame is None:
            continue
        if fmt == "csv":
            frame = frame.copy()
            if "event_time" in frame:
                frame["event_time"] = frame["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
            frame.to_csv(directory / f"{name}.csv", index=False)
        else:
            frame.to_parquet(directory / f"{name}.parquet", index=False)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", ["no_attributes_csv", "no_users_table_mixed_item_attributes", "string_and_numeric_user_attributes"]
)
def test_contract_shape_runs_through_ingestion_labels_and_features(tmp_path, shape):
    simulated = load_source(load_settings())
    items, users, events, fmt = _shape(shape, simulated)
    contract = _write(tmp_path / "contract", items, users, events, fmt)
    # a flat CSV delivery has no cheap first day (docs/DATA_CONTRACT.md): the start date is given, as `gpl run`
    # does after reading it once; the range ends on the data's last day, not today
    days = pd.to_datetime(events["event_time"], utc=True).dt.date
    first, last = days.min().isoformat(), days.max().isoformat()
    gpl = GplSettings(
        source="contract",
        contract_path=str(contract),
        data_dir=str(tmp_path / "data"),
        overrides_json=json.dumps({**OVERRIDES, "contract": {"start_date": first}}),
    )
    assert run_pipeline(first, last, resources={"gpl": gpl}, ephemeral=True, selection=STAGES).success

    settings = gpl.settings()
    warehouse = gpl.warehouse()
    assert warehouse.query("SELECT count(*) AS n FROM pseudo_labels")["n"].iloc[0] >= 0  # the labels stage ran
    assert warehouse.written_days("pseudo_labels") == warehouse.written_days("events")
    store = FeastStore(settings)
    spec = store.spec()
    profile = {f.name: f.dtype for f in store.store.get_feature_view("user_profile").features}
    item_profile = {f.name for f in store.store.get_feature_view("item_profile").features}
    if shape == "no_attributes_csv":
        assert set(profile) == {"user_known"} and item_profile == {
            "item_known",
            "item_content_emb",
            "item_has_content_emb",
        }
    elif shape == "no_users_table_mixed_item_attributes":
        assert spec.item_attributes == {
            "item_cat_topic": ("topic", "String"),
            "item_num_runtime_min": ("runtime_min", "Float64"),
            "item_num_year": ("year", "Float64"),
            "item_num_family": ("family", "Float64"),
        }
    else:
        assert set(spec.user_attributes) == {"user_num_age", "user_cat_country"}

    # A user who appears only in events (or every user, without a users table) is a known user online.
    only_in_events = events["user_id"].drop_duplicates().iloc[0]
    got = store.online_client().get(only_in_events, items["item_id"].head(5).tolist() + ["ghost-item"])
    assert not got.unknown_user and got.unknown_items == ["ghost-item"]
    assert got.frame["u_known"].eq(1).all() and np.isfinite(got.matrix).all()
    assert got.frame["u_requests"].iloc[0] >= 0
    for name, dtype in store.service_features("prerank_v2"):
        if dtype == "String":
            assert got.frame[name].map(lambda v: isinstance(v, str)).all(), name  # "" for empty cells
