import pandas as pd
import pytest
from typer.testing import CliRunner

from gpl_platform.cli.main import app
from gpl_platform.data.contract import ContractError, validate_dataset
from gpl_platform.data.delivery import read_contract_dir
from tests.helpers import tiny_contract_tables, write_contract_dir


def test_valid_tables_are_normalized():
    items, users, events = tiny_contract_tables()
    ds = validate_dataset("tiny", items, users, events)
    assert list(ds.events.columns) == [
        "request_id",
        "user_id",
        "item_id",
        "event_time",
        "exposed",
        "clicked",
        "oracle_label",
        "oracle_probability",
        "propensity",
        "logging_policy",
        "day",
    ]
    assert str(ds.events["event_time"].dtype) == "datetime64[us, UTC]"
    assert ds.events["clicked"].isna().tolist() == [False, False, True, False, True]
    # UTC day: 23:59:59 belongs to the 1st, 00:00:00 to the 2nd.
    assert [str(d) for d in ds.events["day"]] == ["2024-03-01"] * 3 + ["2024-03-02"] * 2


def test_non_utc_offsets_are_converted_to_utc():
    items, users, events = tiny_contract_tables()
    events["event_time"] = events["event_time"].dt.tz_convert("America/New_York")
    ds = validate_dataset("tiny", items, users, events)
    assert str(ds.events["day"].iloc[0]) == "2024-03-01"


def _expect(problem_fragment, column, n_rows, items=None, users=None, events=None, file="events"):
    base_items, base_users, base_events = tiny_contract_tables()
    with pytest.raises(ContractError) as info:
        validate_dataset(
            "tiny",
            base_items if items is None else items,
            base_users if users is None else users,
            base_events if events is None else events,
            files={"items": "items.parquet", "users": "users.parquet", "events": "events.parquet"},
        )
    err = info.value
    assert err.column == column, str(err)
    assert err.n_rows == n_rows, str(err)
    assert problem_fragment in str(err)
    assert f"{file}.parquet" in str(err)
    return err


def test_missing_column():
    _, _, events = tiny_contract_tables()
    _expect("missing required column", "exposed", None, events=events.drop(columns=["exposed"]))


def test_missing_text_column_in_items():
    items, _, _ = tiny_contract_tables()
    _expect("missing required column", "text", None, items=items.drop(columns=["text"]), file="items")


def test_wrong_id_type():
    items, _, _ = tiny_contract_tables()
    items["item_id"] = [1, 2, 3]
    _expect("expected string ids", "item_id", 3, items=items, file="items")


def test_wrong_boolean_type():
    _, _, events = tiny_contract_tables()
    events["exposed"] = ["yes", "no", "no", "yes", "no"]
    _expect("not booleans", "exposed", 5, events=events)


def test_null_ids_and_text():
    items, _, events = tiny_contract_tables()
    events.loc[1, "user_id"] = None
    _expect("null or empty id", "user_id", 1, events=events)
    items.loc[0, "text"] = None
    _expect("null text", "text", 1, items=items, file="items")
    items, _, _ = tiny_contract_tables()
    items.loc[[0, 2], "text"] = "   "
    _expect("empty text", "text", 2, items=items, file="items")


def test_duplicate_request_item_pairs():
    _, _, events = tiny_contract_tables()
    events = pd.concat([events, events.iloc[[0]]], ignore_index=True)
    _expect("repeat a (request_id, item_id) pair", "item_id", 2, events=events)


def test_unknown_items_fail_and_users_only_in_events_join_the_users():
    _, _, events = tiny_contract_tables()
    events.loc[[0, 3], "item_id"] = "zzz"
    events = events.drop_duplicates(["request_id", "item_id"])
    _expect("missing from the items table", "item_id", 2, events=events)
    items, users, events = tiny_contract_tables()
    events.loc[3:, "user_id"] = "ghost"  # request r2 is ghost's: a user the users table does not have
    ds = validate_dataset("tiny", items, users, events)
    assert ds.users["user_id"].tolist() == ["u1", "u2", "ghost"] and pd.isna(ds.users.loc[2, "age"])
    assert ds.info["users_only_in_events"] == 1


def test_naive_timestamps():
    _, _, events = tiny_contract_tables()
    events["event_time"] = events["event_time"].dt.tz_localize(None)
    _expect("naive timestamps", "event_time", 5, events=events)
    _, _, events = tiny_contract_tables()
    events["event_time"] = ["2024-03-01T10:00:00Z"] * 3 + ["2024-03-02T10:00:00"] * 2
    _expect("naive timestamps", "event_time", 2, events=events)


def test_click_labels_follow_exposure():
    _, _, events = tiny_contract_tables()
    events.loc[2, "clicked"] = 0
    _expect("unexposed but carry a click label", "clicked", 1, events=events)
    _, _, events = tiny_contract_tables()
    events.loc[0, "clicked"] = pd.NA
    _expect("exposed but have no click label", "clicked", 1, events=events)
    _, _, events = tiny_contract_tables()
    events["clicked"] = events["clicked"].astype("Float64")
    events.loc[0, "clicked"] = 3
    _expect("not 0, 1 or null", "clicked", 1, events=events)


def test_request_with_two_users():
    _, _, events = tiny_contract_tables()
    events.loc[0, "user_id"] = "u2"
    _expect("more than one user", "user_id", 3, events=events)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_contract_directory_roundtrip(tmp_path, fmt):
    items, users, events = tiny_contract_tables()
    if fmt == "csv":
        events = events.assign(event_time=events["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
        items = items.assign(item_id=["007", "b", "c"])
        events = events.assign(item_id=events["item_id"].replace({"a": "007"}))
    write_contract_dir(tmp_path, items, users, events, fmt)
    ds = read_contract_dir(tmp_path)
    assert len(ds.events) == 5 and ds.has_oracle
    if fmt == "csv":
        assert "007" in set(ds.items["item_id"])  # ids stay strings, leading zeros kept


def test_contract_errors_name_the_file_in_a_folder_of_event_files(tmp_path):
    items, users, events = tiny_contract_tables()
    write_contract_dir(tmp_path, items, users, None)
    (tmp_path / "events").mkdir()
    events.iloc[:3].to_parquet(tmp_path / "events" / "part-0.parquet", index=False)
    bad = events.iloc[3:].copy()
    bad.loc[:, "item_id"] = "nope"
    bad = bad.drop_duplicates(["request_id", "item_id"])
    bad.to_parquet(tmp_path / "events" / "part-1.parquet", index=False)
    with pytest.raises(ContractError, match="part-1.parquet: column 'item_id': 1 row"):
        read_contract_dir(tmp_path)


def test_cli_validate_exit_codes(tmp_path):
    items, users, events = tiny_contract_tables()
    good = write_contract_dir(tmp_path / "good", items, users, events)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("valid: 3 items, 2 users, 5 events in 2 requests over 2 days")
    events.loc[0, "user_id"] = None
    bad = write_contract_dir(tmp_path / "bad", items, users, events)
    result = runner.invoke(app, ["data", "validate", str(bad)])
    assert result.exit_code == 1
    assert "events.parquet: column 'user_id': 1 row(s)" in result.output
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "not a directory" in result.output


def test_an_events_table_without_rows_is_refused(tmp_path):
    items, users, events = tiny_contract_tables()
    write_contract_dir(tmp_path, items, users, events.iloc[0:0])
    with pytest.raises(ContractError, match="events.parquet: has no rows"):
        read_contract_dir(tmp_path)
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 1 and "has no rows" in result.output and "nan" not in result.output


def test_csv_cells_na_none_null_are_text_and_only_empty_cells_are_missing(tmp_path):
    items, users, events = tiny_contract_tables()
    items["item_id"] = ["NA", "None", "null"]
    items["genre"] = ["NA", "", "x"]
    events["item_id"] = events["item_id"].map({"a": "NA", "b": "None", "c": "null"})
    events["event_time"] = events["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    write_contract_dir(tmp_path, items, users, events, "csv")
    ds = read_contract_dir(tmp_path)
    assert ds.items["item_id"].tolist() == ["NA", "None", "null"]
    assert ds.items["genre"].tolist()[0] == "NA" and pd.isna(ds.items["genre"].tolist()[1])
    assert set(ds.events["item_id"]) == {"NA", "None", "null"}
    (tmp_path / "users.csv").write_text("user_id,age\nu1,30\n,40\n")  # an empty id cell: missing, said so
    with pytest.raises(ContractError, match=r"null or empty id \(e.g. <empty>\)"):
        read_contract_dir(tmp_path)


def test_a_lowercase_z_is_utc():
    items, users, events = tiny_contract_tables()
    events["event_time"] = ["2024-03-01T23:59:59z"] * 3 + ["2024-03-02T00:00:00z"] * 2
    ds = validate_dataset("tiny", items, users, events)
    assert [str(d) for d in ds.events["day"]] == ["2024-03-01"] * 3 + ["2024-03-02"] * 2


@pytest.mark.parametrize("columns", [("Genre", "genre"), ("gen re", "gen-re")])
def test_attribute_columns_that_become_one_feature_are_refused(columns):
    items, users, _ = tiny_contract_tables()
    items = items.drop(columns="genre").assign(**{columns[0]: ["x", "y", "z"], columns[1]: ["1", "2", "3"]})
    _expect(f"and column {columns[0]!r} both become the feature", columns[1], None, items=items, file="items")
    users = users.assign(**{columns[0]: [1, 2], columns[1]: [3, 4]})
    _expect("rename one of them", columns[1], None, users=users, file="users")


def test_a_file_linked_from_outside_the_directory_is_not_read(tmp_path):
    items, users, events = tiny_contract_tables()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("root:x:0:0:root:/root:/bin/bash\n")
    contract = write_contract_dir(tmp_path / "contract", items, None, events)
    (contract / "users.csv").symlink_to(outside / "secret.csv")
    with pytest.raises(ContractError, match="symbolic link .* outside the contract directory") as info:
        read_contract_dir(contract)
    assert "root:x" not in str(info.value)
    (contract / "users.csv").unlink()
    (contract / "users.csv").symlink_to(contract / "items.parquet")  # a link inside the directory is fine to follow
    with pytest.raises(ContractError, match="users.csv"):  # (here: an items file read as CSV users)
        read_contract_dir(contract)


def test_export_over_an_earlier_export_of_the_other_format_validates(tmp_path):
    from gpl_platform.data.stats import export_contract_dir

    items, users, events = tiny_contract_tables()
    ds = validate_dataset("tiny", items, users, events)
    export_contract_dir(ds, tmp_path, csv=True)
    export_contract_dir(ds, tmp_path, csv=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet", "items.parquet", "users.parquet"]
    assert len(read_contract_dir(tmp_path).events) == 5
    result = CliRunner().invoke(app, ["data", "export", str(tmp_path), "--source", "simulator", "--csv"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "items.csv", "users.csv"]
    assert CliRunner().invoke(app, ["data", "validate", str(tmp_path)]).exit_code == 0
    (tmp_path / "items.parquet").write_bytes((tmp_path / "items.csv").read_bytes())  # two formats of one table
    with pytest.raises(ContractError, match="items.parquet and items.csv: one table, one file format"):
        read_contract_dir(tmp_path)
