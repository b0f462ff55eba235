"""The data contract: what items, users and events must look like, and its validation.

Every source (MovieLens, the simulator, a user's own directory of files) produces the same three
tables and passes through :func:`validate_dataset` before anything is written, so bad input fails
whole, with a message naming the file, the column and how many rows offend.
See docs/DATA_CONTRACT.md for the user-facing description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from gpl_platform.data.contract_errors import ORIGIN, ContractError, fail_rows, origin_file
from gpl_platform.data.policies import (
    DEFAULT_POLICIES,
    POLICY_COLUMN,
    PRODUCTION_POLICY,
    LoggingPolicies,
    checked_propensities,
    validated_policies,
)

ITEM_REQUIRED = ("item_id", "text")
USER_REQUIRED = ("user_id",)
EVENT_REQUIRED = ("request_id", "user_id", "item_id", "event_time", "exposed", "clicked")
EVENT_OPTIONAL = ("oracle_label", "oracle_probability", "propensity", POLICY_COLUMN)
#: benchmark-only columns: what a simulator knows of the truth, stored apart from the events (`oracle_labels`)
ORACLE_EVENT_COLUMNS = ("oracle_label", "oracle_probability")
# Names the platform adds to a frame while reading it: a delivered column of that name would be overwritten.
RESERVED_COLUMNS = (ORIGIN,)


@dataclass
class Dataset:
    """The three contract tables of one source, validated and normalized."""

    name: str
    items: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    info: dict = field(default_factory=dict)

    @property
    def has_oracle(self) -> bool:
        return "oracle_label" in self.events and self.events["oracle_label"].notna().any()


def _require_columns(df: pd.DataFrame, file: str, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ContractError(
            file, missing[0], None, f"missing required column(s) {missing}; found {sorted(map(str, df.columns))}"
        )


def _string_ids(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    if not (ptypes.is_string_dtype(col) or ptypes.is_object_dtype(col)):
        raise ContractError(
            origin_file(df, file),
            column,
            len(col),
            f"have type {col.dtype}, expected string ids (cast the column to string)",
        )
    if ptypes.infer_dtype(col, skipna=True) != "string":  # a C-level scan; the per-value test only when it fails
        fail_rows(df, file, column, col.notna() & ~col.map(lambda v: isinstance(v, str)), "are not strings")
    fail_rows(df, file, column, col.isna() | (col.astype("string").str.strip() == ""), "have a null or empty id")
    return col.astype(str)


def validate_items(items: pd.DataFrame, file: str = "items") -> pd.DataFrame:
    _require_columns(items, file, ITEM_REQUIRED)
    out = items.copy()
    out["item_id"] = _string_ids(out, file, "item_id")
    text = out["text"]
    fail_rows(out, file, "text", text.isna(), "have null text")
    fail_rows(out, file, "text", ~text.map(lambda v: isinstance(v, str)), "have non-string text")
    fail_rows(out, file, "text", text.str.strip() == "", "have empty text")
    fail_rows(out, file, "item_id", out["item_id"].duplicated(keep=False), "have a duplicate item_id")
    _check_attribute_names(out, file, ("item_id", "text"))
    return out.reset_index(drop=True)


def validate_users(users: pd.DataFrame, file: str = "users") -> pd.DataFrame:
    _require_columns(users, file, USER_REQUIRED)
    out = users.copy()
    out["user_id"] = _string_ids(out, file, "user_id")
    fail_rows(out, file, "user_id", out["user_id"].duplicated(keep=False), "have a duplicate user_id")
    _check_attribute_names(out, file, ("user_id",))
    return out.reset_index(drop=True)


def _utc_timestamps(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    fail_rows(df, file, column, col.isna(), "have a null timestamp")
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    if ptypes.is_datetime64_dtype(col):
        raise ContractError(
            origin_file(df, file),
            column,
            len(col),
            "are naive timestamps (no time zone); write them as UTC, e.g. 2024-01-31T12:00:00Z",
        )
    if ptypes.is_object_dtype(col) or ptypes.is_string_dtype(col):
        text = _uppercase_utc_suffix(col.astype(str))
        # An explicit offset or Z is required: a naive wall-clock time is ambiguous.
        has_tz = text.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})\s*$", regex=True)
        fail_rows(df, file, column, ~has_tz, "are naive timestamps (no time zone offset); append Z or +00:00")
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        fail_rows(df, file, column, parsed.isna(), "are not parseable ISO-8601 timestamps")
        return parsed.astype("datetime64[us, UTC]")
    raise ContractError(origin_file(df, file), column, len(col), f"have type {col.dtype}, expected a UTC timestamp")


def _boolean(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    fail_rows(df, file, column, col.isna(), "are null (expected true/false)")
    if ptypes.is_bool_dtype(col):
        return col.astype(bool)
    mapping = {"true": True, "false": False, "1": True, "0": False, "t": True, "f": False}
    as_text = col.astype(str).str.strip().str.lower()
    fail_rows(df, file, column, ~as_text.isin(mapping), "are not booleans (true/false or 1/0)")
    return as_text.map(mapping).astype(bool)


def _binary_nullable(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    if ptypes.is_bool_dtype(col):
        return col.astype("Int8")
    numeric = pd.to_numeric(col, errors="coerce")
    fail_rows(df, file, column, col.notna() & numeric.isna(), "are not numbers (expected 0, 1 or null)")
    fail_rows(df, file, column, numeric.notna() & ~numeric.isin([0, 1]), "are not 0, 1 or null")
    return numeric.astype("Int8")


def _propensity(df: pd.DataFrame, file: str) -> pd.Series:
    """Optional logging propensities: P(exposed) under the logging policy, in (0, 1], null when unknown
    (which rows need one depends on their policy: :func:`checked_propensities`)."""
    return _probability(df, file, "propensity", lambda p: (p > 0) & (p <= 1), "(0, 1]")


def _probability(df: pd.DataFrame, file: str, column: str, valid, interval: str) -> pd.Series:
    """A nullable probability column: numbers where not null, each ``valid`` (in ``interval``)."""
    col = df[column]
    numeric = pd.to_numeric(col, errors="coerce")
    fail_rows(df, file, column, col.notna() & numeric.isna(), "are not numbers (expected a probability or null)")
    fail_rows(df, file, column, numeric.notna() & ~valid(numeric), f"are not probabilities in {interval}")
    return numeric.astype("float64")


def _oracle_probability(df: pd.DataFrame, file: str) -> pd.Series:
    """Optional true click probabilities (a simulator's, which its oracle labels are drawn from): in [0, 1],
    null when unknown."""
    return _probability(df, file, "oracle_probability", lambda p: p.between(0, 1), "[0, 1]")


def validate_events(
    events: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None = None,
    file: str = "events",
    require_rows: bool = True,
    policies: LoggingPolicies = DEFAULT_POLICIES,
) -> pd.DataFrame:
    """Validate and normalize events against the (already validated) items and users. ``require_rows``:
    a delivery without events is refused; a read of some day folders may have none (no delivery yet).
    ``policies``: the logging-policy names the log may use (:mod:`gpl_platform.data.policies`)."""
    _require_columns(events, file, EVENT_REQUIRED)
    if require_rows:
        _require_rows(events, file)
    out = events.copy()
    for column in ("request_id", "user_id", "item_id"):
        out[column] = _string_ids(out, file, column)
    out["event_time"] = _utc_timestamps(out, file, "event_time")
    out["exposed"] = _boolean(out, file, "exposed")
    out["clicked"] = _binary_nullable(out, file, "clicked")
    fail_rows(out, file, "clicked", out["exposed"] & out["clicked"].isna(), "are exposed but have no click label")
    fail_rows(
        out,
        file,
        "clicked",
        ~out["exposed"] & out["clicked"].notna(),
        "are unexposed but carry a click label (must be null: nobody saw them)",
    )
    if "oracle_label" in out:
        out["oracle_label"] = _binary_nullable(out, file, "oracle_label")
    else:
        out["oracle_label"] = pd.array([pd.NA] * len(out), dtype="Int8")
    out["oracle_probability"] = _oracle_probability(out, file) if "oracle_probability" in out else np.nan
    out[POLICY_COLUMN] = validated_policies(out, file, policies)
    out["propensity"] = _propensity(out, file) if "propensity" in out else np.nan
    out["propensity"] = checked_propensities(out, file, policies)
    fail_rows(
        out,
        file,
        "item_id",
        out.duplicated(["request_id", "item_id"], keep=False),
        "repeat a (request_id, item_id) pair",
    )
    fail_rows(out, file, "item_id", ~out["item_id"].isin(items["item_id"]), "name items missing from the items table")
    per_request = out.groupby("request_id", sort=False).agg(
        n_users=("user_id", "nunique"), n_times=("event_time", "nunique")
    )
    for column, agg, what in (("user_id", "n_users", "user"), ("event_time", "n_times", "event_time")):
        bad = out["request_id"].map(per_request[agg] > 1)
        fail_rows(out, file, column, bad, f"belong to a request that has more than one {what}")
    return out.reset_index(drop=True)


def normalize_events_frame(events: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes every consumer can rely on (adds the UTC `day`)."""
    out = events.reindex(columns=[*EVENT_REQUIRED, *ORACLE_EVENT_COLUMNS, "propensity", POLICY_COLUMN]).copy()
    out["oracle_probability"] = pd.to_numeric(out["oracle_probability"], errors="coerce").astype("float64")
    out["propensity"] = pd.to_numeric(out["propensity"], errors="coerce").astype("float64")
    out[POLICY_COLUMN] = out[POLICY_COLUMN].where(out[POLICY_COLUMN].notna(), PRODUCTION_POLICY).astype(object)
    out["day"] = out["event_time"].dt.tz_convert("UTC").dt.date
    return out


def validate_dataset(
    name: str,
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    events: pd.DataFrame,
    files: dict[str, str] | None = None,
    info: dict | None = None,
    require_rows: bool = True,
    policies: LoggingPolicies = DEFAULT_POLICIES,
) -> Dataset:
    """Validate all three tables; users default to the distinct users of the events."""
    files = files or {}
    items_v = validate_items(items, files.get("items", "items"))
    users_v = validate_users(users, files.get("users", "users")) if users is not None else None
    events_v = validate_events(events, items_v, users_v, files.get("events", "events"), require_rows, policies)
    info = dict(info or {})
    users_v, info["users_only_in_events"] = _with_event_users(users_v, events_v)
    for frame in (items_v, users_v, events_v):
        frame.drop(columns=[ORIGIN], errors="ignore", inplace=True)
    return Dataset(name, items_v, users_v, normalize_events_frame(events_v), info)


# ---- helpers of the checks above ----------------------------------------------------------


def _require_rows(frame: pd.DataFrame, file: str) -> None:
    if len(frame) == 0:
        raise ContractError(
            origin_file(frame, file), None, None, "has no rows: a contract directory needs at least one event"
        )


def _uppercase_utc_suffix(text: pd.Series) -> pd.Series:
    """``...z`` is ``...Z`` (ISO 8601 allows both; pandas parses only the capital)."""
    return text.str.replace(r"z\s*$", "Z", regex=True)


def attribute_feature_name(column: str) -> str:
    """The part of a feature name an attribute column gives: lower case, other characters as ``_`` (the
    contract refuses two columns that give the same part; the feature schema names features by it)."""
    out = re.sub(r"[^0-9a-zA-Z_]", "_", str(column)).strip("_").lower()
    return out or "col"


def _check_attribute_names(frame: pd.DataFrame, file: str, keys: tuple[str, ...]) -> None:
    """Attribute columns whose feature names would collide (``Genre``/``genre``, ``gen re``/``gen-re``)."""
    seen: dict[str, str] = {}
    for column in frame.columns:
        if column in keys or column == ORIGIN:
            continue
        name = attribute_feature_name(column)
        if name in seen:
            raise ContractError(
                file,
                str(column),
                None,
                f"and column {seen[name]!r} both become the feature '{name}' (names are lower-cased, "
                "other characters become '_'): rename one of them",
            )
        seen[name] = str(column)


def _with_event_users(users: pd.DataFrame | None, events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Users of the events that the users table lacks (or every user, without one) join it with empty
    attributes; their count is returned and reported (``gpl data validate``, ingestion metadata)."""
    seen = pd.unique(events["user_id"])
    if users is None:
        return pd.DataFrame({"user_id": seen}), len(seen)
    extra = seen[~pd.Index(seen).isin(users["user_id"])].tolist()
    if not extra:
        return users, 0
    return pd.concat([users, pd.DataFrame({"user_id": extra})], ignore_index=True), len(extra)
