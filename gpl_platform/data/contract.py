"""The data contract: what items, users and events must look like, and its validation.

Every source (MovieLens, the simulator, a user's own directory of files) produces the same three
tables and passes through :func:`validate_dataset` before anything is written, so bad input fails
whole, with a message naming the file, the column and how many rows offend.
See docs/DATA_CONTRACT.md for the user-facing description.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

ITEM_REQUIRED = ("item_id", "text")
USER_REQUIRED = ("user_id",)
EVENT_REQUIRED = ("request_id", "user_id", "item_id", "event_time", "exposed", "clicked")
EVENT_OPTIONAL = ("oracle_label", "propensity")
ORIGIN = "__origin_file"  # per-row source file name, kept only while validating
# Names the platform adds to a frame while reading it: a delivered column of that name would be overwritten.
RESERVED_COLUMNS = (ORIGIN,)


class ContractError(ValueError):
    """Input that breaks the data contract. Names the file, column and offending row count."""

    def __init__(self, file: str, column: str | None, n_rows: int | None, problem: str, examples: list | None = None):
        self.file, self.column, self.n_rows, self.problem = file, column, n_rows, problem
        where = f"{file}: column '{column}'" if column else f"{file}"
        count = f": {n_rows} row(s) {problem}" if n_rows is not None else f": {problem}"
        ex = f" (e.g. {', '.join(map(_example, examples[:3]))})" if examples else ""
        super().__init__(where + count + ex)


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


def _origin(df: pd.DataFrame, default: str, mask: pd.Series | np.ndarray | None = None) -> str:
    """The file(s) the offending rows came from, for error messages."""
    if ORIGIN not in df:
        return default
    files = df.loc[mask, ORIGIN] if mask is not None else df[ORIGIN]
    names = sorted(set(files.dropna().astype(str)))
    if not names:
        return default
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more files)"


def _fail(df, file, column, mask, problem):
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    if n:
        examples = df.loc[mask, column].head(3).tolist() if column in df else None
        raise ContractError(_origin(df, file, mask), column, n, problem, examples)


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
            _origin(df, file),
            column,
            len(col),
            f"have type {col.dtype}, expected string ids (cast the column to string)",
        )
    if ptypes.infer_dtype(col, skipna=True) != "string":  # a C-level scan; the per-value test only when it fails
        _fail(df, file, column, col.notna() & ~col.map(lambda v: isinstance(v, str)), "are not strings")
    _fail(df, file, column, col.isna() | (col.astype("string").str.strip() == ""), "have a null or empty id")
    return col.astype(str)


def validate_items(items: pd.DataFrame, file: str = "items") -> pd.DataFrame:
    _require_columns(items, file, ITEM_REQUIRED)
    out = items.copy()
    out["item_id"] = _string_ids(out, file, "item_id")
    text = out["text"]
    _fail(out, file, "text", text.isna(), "have null text")
    _fail(out, file, "text", ~text.map(lambda v: isinstance(v, str)), "have non-string text")
    _fail(out, file, "text", text.str.strip() == "", "have empty text")
    _fail(out, file, "item_id", out["item_id"].duplicated(keep=False), "have a duplicate item_id")
    _check_attribute_names(out, file, ("item_id", "text"))
    return out.reset_index(drop=True)


def validate_users(users: pd.DataFrame, file: str = "users") -> pd.DataFrame:
    _require_columns(users, file, USER_REQUIRED)
    out = users.copy()
    out["user_id"] = _string_ids(out, file, "user_id")
    _fail(out, file, "user_id", out["user_id"].duplicated(keep=False), "have a duplicate user_id")
    _check_attribute_names(out, file, ("user_id",))
    return out.reset_index(drop=True)


def _utc_timestamps(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    _fail(df, file, column, col.isna(), "have a null timestamp")
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    if ptypes.is_datetime64_dtype(col):
        raise ContractError(
            _origin(df, file),
            column,
            len(col),
            "are naive timestamps (no time zone); write them as UTC, e.g. 2024-01-31T12:00:00Z",
        )
    if ptypes.is_object_dtype(col) or ptypes.is_string_dtype(col):
        text = _uppercase_utc_suffix(col.astype(str))
        # An explicit offset or Z is required: a naive wall-clock time is ambiguous.
        has_tz = text.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})\s*$", regex=True)
        _fail(df, file, column, ~has_tz, "are naive timestamps (no time zone offset); append Z or +00:00")
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        _fail(df, file, column, parsed.isna(), "are not parseable ISO-8601 timestamps")
        return parsed.astype("datetime64[us, UTC]")
    raise ContractError(_origin(df, file), column, len(col), f"have type {col.dtype}, expected a UTC timestamp")


def _boolean(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    _fail(df, file, column, col.isna(), "are null (expected true/false)")
    if ptypes.is_bool_dtype(col):
        return col.astype(bool)
    mapping = {"true": True, "false": False, "1": True, "0": False, "t": True, "f": False}
    as_text = col.astype(str).str.strip().str.lower()
    _fail(df, file, column, ~as_text.isin(mapping), "are not booleans (true/false or 1/0)")
    return as_text.map(mapping).astype(bool)


def _binary_nullable(df: pd.DataFrame, file: str, column: str) -> pd.Series:
    col = df[column]
    if ptypes.is_bool_dtype(col):
        return col.astype("Int8")
    numeric = pd.to_numeric(col, errors="coerce")
    _fail(df, file, column, col.notna() & numeric.isna(), "are not numbers (expected 0, 1 or null)")
    _fail(df, file, column, numeric.notna() & ~numeric.isin([0, 1]), "are not 0, 1 or null")
    return numeric.astype("Int8")


def _propensity(df: pd.DataFrame, file: str) -> pd.Series:
    """Optional logging propensities: P(exposed) under the logging policy, in (0, 1], null when unknown."""
    col = df["propensity"]
    numeric = pd.to_numeric(col, errors="coerce")
    _fail(df, file, "propensity", col.notna() & numeric.isna(), "are not numbers (expected a probability or null)")
    _fail(
        df, file, "propensity", numeric.notna() & ~((numeric > 0) & (numeric <= 1)), "are not probabilities in (0, 1]"
    )
    _fail(
        df,
        file,
        "propensity",
        df["exposed"] & numeric.isna() & numeric.notna().any(),
        "are exposed but have no propensity while other rows have one (give all exposed rows one, or none)",
    )
    return numeric.astype("float64")


def validate_events(
    events: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None = None,
    file: str = "events",
    require_rows: bool = True,
) -> pd.DataFrame:
    """Validate and normalize events against the (already validated) items and users. ``require_rows``:
    a delivery without events is refused; a read of some day folders may have none (no delivery yet)."""
    _require_columns(events, file, EVENT_REQUIRED)
    if require_rows:
        _require_rows(events, file)
    out = events.copy()
    for column in ("request_id", "user_id", "item_id"):
        out[column] = _string_ids(out, file, column)
    out["event_time"] = _utc_timestamps(out, file, "event_time")
    out["exposed"] = _boolean(out, file, "exposed")
    out["clicked"] = _binary_nullable(out, file, "clicked")
    _fail(out, file, "clicked", out["exposed"] & out["clicked"].isna(), "are exposed but have no click label")
    _fail(
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
    out["propensity"] = _propensity(out, file) if "propensity" in out else np.nan
    _fail(
        out,
        file,
        "item_id",
        out.duplicated(["request_id", "item_id"], keep=False),
        "repeat a (request_id, item_id) pair",
    )
    _fail(out, file, "item_id", ~out["item_id"].isin(items["item_id"]), "name items missing from the items table")
    per_request = out.groupby("request_id", sort=False).agg(
        n_users=("user_id", "nunique"), n_times=("event_time", "nunique")
    )
    for column, agg, what in (("user_id", "n_users", "user"), ("event_time", "n_times", "event_time")):
        bad = out["request_id"].map(per_request[agg] > 1)
        _fail(out, file, column, bad, f"belong to a request that has more than one {what}")
    return out.reset_index(drop=True)


def normalize_events_frame(events: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes every consumer can rely on (adds the UTC `day`)."""
    out = events.reindex(
        columns=["request_id", "user_id", "item_id", "event_time", "exposed", "clicked", "oracle_label", "propensity"]
    ).copy()
    out["propensity"] = pd.to_numeric(out["propensity"], errors="coerce").astype("float64")
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
) -> Dataset:
    """Validate all three tables; users default to the distinct users of the events."""
    files = files or {}
    items_v = validate_items(items, files.get("items", "items"))
    users_v = validate_users(users, files.get("users", "users")) if users is not None else None
    events_v = validate_events(events, items_v, users_v, files.get("events", "events"), require_rows)
    info = dict(info or {})
    users_v, info["users_only_in_events"] = _with_event_users(users_v, events_v)
    for frame in (items_v, users_v, events_v):
        frame.drop(columns=[ORIGIN], errors="ignore", inplace=True)
    return Dataset(name, items_v, users_v, normalize_events_frame(events_v), info)


# ---- reading a contract directory ---------------------------------------------------------

READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# CSV ids stay strings (a leading zero or "007" is an id, not a number).
_CSV_DTYPES = {"item_id": str, "user_id": str, "request_id": str, "text": str}


def _read_table_file(path: Path) -> pd.DataFrame:
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ContractError(str(path), None, None, "has an unsupported extension (use .parquet or .csv)")
    # The names as the file has them: pandas renames a repeated CSV header (`topic` -> `topic.1`).
    check_column_names(file_column_names(path), str(path))
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        # Only an empty cell is missing: NA, None, null... are text (an id, a country code).
        return pd.read_csv(path, dtype=_CSV_DTYPES, keep_default_na=False, na_values=[""])
    except Exception as exc:  # unreadable file: say which one
        raise ContractError(str(path), None, None, f"cannot be read as {kind}: {exc}") from exc


def file_column_names(path: Path) -> list[str]:
    """The column names a data file declares, read from its header or footer only (no rows)."""
    kind = READERS.get(path.suffix.lower())
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            return [n for n in names if not n.startswith("__index_level_")]  # pandas' saved index, not data
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return next(csv.reader(fh), [])
    except Exception as exc:  # unreadable file: say which one
        raise ContractError(str(path), None, None, f"cannot be read as {kind}: {exc}") from exc


def check_column_names(names: Sequence[str], file: str) -> None:
    """Refuse column names the platform cannot keep apart or would overwrite: a name given twice, a reserved
    name, an empty name or one with control characters (they would break a log line or an error message)."""
    seen = set()
    for name in names:
        if name in seen:
            raise ContractError(file, str(name), None, "appears twice in the header: every column needs its own name")
        seen.add(name)
        if name in RESERVED_COLUMNS:
            raise ContractError(file, str(name), None, "is a name the platform reserves for its own use: rename it")
        if not str(name).strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in str(name)):
            raise ContractError(file, repr(str(name)), None, "is an empty name or contains control characters")


def contract_files(directory: Path, table: str, required: bool = True) -> list[Path]:
    """``<table>.parquet|csv`` or a ``<table>/`` folder of such files (``events/`` also by day folders)."""
    directory = Path(directory)
    direct = [directory / f"{table}{ext}" for ext in READERS if (directory / f"{table}{ext}").is_file()]
    folder = directory / table
    nested = table_folder_files(folder, table) if folder.is_dir() else []
    found = direct + nested
    _check_inside(directory, [folder, *found])
    if len(direct) > 1:
        raise ContractError(
            str(directory),
            None,
            None,
            f"has {' and '.join(p.name for p in direct)}: one table, one file format (remove the "
            "stale one, e.g. from an earlier export)",
        )
    if direct and nested:
        raise ContractError(
            str(directory), None, None, f"has both {direct[0].name} and a {table}/ folder: keep one of them"
        )
    if not found and required:
        raise ContractError(
            str(directory),
            None,
            None,
            f"has no '{table}' table: expected {table}.parquet, {table}.csv or a {table}/ folder",
        )
    return found


def read_contract_table(directory: Path, table: str, required: bool = True) -> tuple[pd.DataFrame | None, str]:
    files = contract_files(directory, table, required)
    if not files:
        return None, table
    frames = []
    for path in files:
        frame = _read_table_file(path)
        frame[ORIGIN] = str(path.relative_to(directory)) if path.is_relative_to(directory) else path.name
        frames.append(frame)
    label = str(files[0]) if len(files) == 1 else f"{Path(directory) / table}/ ({len(files)} files)"
    if len(frames) > 1:
        columns = {tuple(sorted(f.columns)) for f in frames}
        if len(columns) > 1:
            raise ContractError(label, None, None, "files of one table have different columns")
    return pd.concat(frames, ignore_index=True), label


def read_contract_dir(
    directory: Path, days: Sequence[date] | None = None, time_window: tuple[datetime, datetime] | None = None
) -> Dataset:
    """Read and validate a contract directory.

    ``days``: with the day-folder layout, read only these days' folders (a daily run reads one day,
    not the whole history); ignored for the flat layout. ``time_window``: event times outside
    [start, end) are refused with the offending rows named (default: :func:`plausible_time_window`)."""
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ContractError(str(directory), None, None, "is not a directory")
    items, items_file = read_contract_table(directory, "items")
    users, users_file = read_contract_table(directory, "users", required=False)
    folders = event_day_folders(directory)
    some_days = folders is not None and days is not None
    if some_days:
        events, events_file = read_event_days(directory, folders, days)
    else:
        events, events_file = read_contract_table(directory, "events")
    origins = events[ORIGIN].to_numpy() if ORIGIN in events else None
    dataset = validate_dataset(
        f"contract:{directory}",
        items,
        users,
        events,
        files={"items": items_file, "users": users_file, "events": events_file},
        info={"path": str(directory), "layout": "day folders" if folders is not None else "flat"},
        require_rows=not some_days,
    )
    check_event_times(dataset.events, origins, time_window or plausible_time_window(), events_file)
    if folders is not None:
        check_day_folders(dataset.events, origins)
    return dataset


# ---- day-partitioned deliveries, time window, first day --------------------------------------
# Delivery layout (docs/DATA_CONTRACT.md): events/day=YYYY-MM-DD/*.parquet|csv, one folder per UTC day.
# Names starting with "." or "_" (editor files, Spark's _SUCCESS and .crc markers) are not data.

DAY_FOLDER = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


def _is_data_name(path: Path) -> bool:
    return not path.name.startswith((".", "_"))


def _folder_day(folder: Path) -> date | None:
    match = DAY_FOLDER.match(folder.name)
    if not match:
        return None
    try:
        return date.fromisoformat(match.group(1))
    except ValueError:
        return None


def _data_files(folder: Path, what: str, root: Path) -> list[Path]:
    """The data files directly in ``folder`` (a folder of the contract directory ``root``), each checked to lie
    inside ``root``."""
    _check_inside(root, [folder])
    entries = sorted(p for p in folder.iterdir() if _is_data_name(p))
    _check_inside(root, entries)
    for path in entries:
        if path.is_dir():
            raise ContractError(
                str(path),
                None,
                None,
                f"is a folder inside {what}: nested folders are not read "
                "(the only nested layout is events/day=YYYY-MM-DD/<files>)",
            )
        if path.suffix.lower() not in READERS:
            raise ContractError(str(path), None, None, "has an unsupported extension (use .parquet or .csv)")
    return entries


def table_folder_files(folder: Path, table: str) -> list[Path]:
    """The data files of a ``<table>/`` folder of a contract directory: files directly in it, or (``events/``
    only) the files of its ``day=YYYY-MM-DD/`` folders. Anything else nested is refused, never skipped."""
    root = folder.parent.resolve()
    _check_inside(root, [folder])
    day_folders = [p for p in sorted(folder.iterdir()) if p.is_dir() and _is_data_name(p)]
    if not day_folders or table != "events":
        return _data_files(folder, f"{folder.name}/", root)
    for path in day_folders:
        if _folder_day(path) is None:
            raise ContractError(
                str(path),
                None,
                None,
                "is a folder in events/ that is not named day=YYYY-MM-DD "
                "(a real date): nested folders are read only in that layout",
            )
    loose = [p for p in folder.iterdir() if p.is_file() and _is_data_name(p)]
    if loose:
        raise ContractError(
            str(loose[0]),
            None,
            None,
            "is a file beside day=YYYY-MM-DD/ folders in events/: put every events file in the folder of its day",
        )
    return [f for path in day_folders for f in _data_files(path, f"events/{path.name}/", root)]


def event_day_folders(directory: Path, window: tuple[datetime, datetime] | None = None) -> dict[date, Path] | None:
    """``{day: folder}`` when ``directory/events/`` holds ``day=YYYY-MM-DD/`` folders, else None (flat).

    ``window``: a folder whose day lies outside it (a clock error, ``day=1970-01-01``) is refused by name;
    callers that plan partitions from the folders pass it, so a stray folder cannot plan thousands of days."""
    folder = Path(directory) / "events"
    if not folder.is_dir() or not any(p.is_dir() and _is_data_name(p) for p in folder.iterdir()):
        return None
    table_folder_files(folder, "events")  # refuses badly named folders, loose files and links out
    folders = {_folder_day(p): p for p in sorted(folder.iterdir()) if p.is_dir() and _is_data_name(p)}
    if window is not None:
        start, end = (pd.Timestamp(t).tz_convert("UTC") for t in window)
        for day, path in folders.items():
            if not start <= pd.Timestamp(day).tz_localize("UTC") < end:  # the day's first instant
                raise ContractError(
                    str(path),
                    None,
                    None,
                    f"is a day outside the plausible window {start.date()} .. {end.date()}: a clock "
                    "error? Remove the folder (or set contract.earliest_event_time / "
                    "contract.max_future_days if its events are real)",
                )
    return folders


def day_folder_files(directory: Path, folder: Path) -> list[Path]:
    """The data files of one ``events/day=YYYY-MM-DD/`` folder of the contract directory ``directory``."""
    return _data_files(folder, f"events/{folder.name}/", Path(directory).resolve())


def read_event_days(directory: Path, folders: dict[date, Path], days: Sequence[date]) -> tuple[pd.DataFrame, str]:
    """The events of ``days`` only (a day without a folder has no events); same columns as a full read."""
    wanted = [folders[d] for d in sorted(set(days)) if d in folders]
    files = [f for folder in wanted for f in day_folder_files(directory, folder)]
    frames = []
    for path in files:
        frame = _read_table_file(path)
        frame[ORIGIN] = str(path.relative_to(directory))
        frames.append(frame)
    label = f"{directory / 'events'}/ ({len(files)} files of {len(wanted)} day folders)"
    if not frames:  # no delivery for these days: an empty frame with the columns of a delivered file
        for folder in folders.values():
            for some in day_folder_files(directory, folder):
                try:
                    return _read_table_file(some).iloc[0:0].assign(**{ORIGIN: pd.Series(dtype="object")}), label
                except ContractError:  # that day's own run reports it
                    continue
        return pd.DataFrame({c: pd.Series(dtype="object") for c in [*EVENT_REQUIRED, ORIGIN]}), label
    if len({tuple(sorted(f.columns)) for f in frames}) > 1:
        raise ContractError(label, None, None, "files of one table have different columns")
    return pd.concat(frames, ignore_index=True), label


def plausible_time_window(
    earliest: date = date(1990, 1, 1), max_future_days: int = 1, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """[earliest 00:00 UTC, now + max_future_days): event times outside it are clock errors."""
    now = now or datetime.now(UTC)
    return (datetime(earliest.year, earliest.month, earliest.day, tzinfo=UTC), now + timedelta(days=max_future_days))


def check_event_times(events: pd.DataFrame, origins, window: tuple[datetime, datetime], file: str) -> None:
    """Refuse event times outside ``window``, naming the file, the count and example requests."""
    start, end = (pd.Timestamp(t) for t in window)
    times = events["event_time"]
    bad = ((times < start) | (times >= end)).to_numpy()
    if bad.any():
        frame = events.assign(**{ORIGIN: origins}) if origins is not None else events
        examples = [
            f"{r} at {t.isoformat()}"
            for r, t in zip(events.loc[bad, "request_id"].head(3), events.loc[bad, "event_time"].head(3))
        ]
        raise ContractError(
            _origin(frame, file, bad),
            "event_time",
            int(bad.sum()),
            f"lie outside the plausible window {start.date()} .. {end.date()} (set "
            "contract.earliest_event_time / contract.max_future_days if they are real)",
            examples,
        )


def check_day_folders(events: pd.DataFrame, origins) -> None:
    """Every row of events/day=D/ must have its UTC day equal to D."""
    if origins is None or not len(events):
        return
    # a day's rows come from a few files: read each file's folder day once, then spread it over the rows
    codes, files = pd.factorize(pd.Series(origins))
    file_day = np.array([_folder_day(Path(f).parent) for f in files] + [None], dtype=object)
    bad = file_day[codes] != events["day"].to_numpy(dtype=object)  # (a code of -1, no origin, meets None)
    if bad.any():
        frame = events.assign(**{ORIGIN: origins})
        raise ContractError(
            _origin(frame, "events", bad),
            "event_time",
            int(bad.sum()),
            "fall on another UTC day than their day=YYYY-MM-DD folder",
            [str(t) for t in events.loc[bad, "event_time"].head(3)],
        )


def contract_day_span(directory: Path, window: tuple[datetime, datetime] | None = None) -> tuple[date, date] | None:
    """The data's first and last UTC day without reading rows: the day folders' names, or the column
    statistics of ``event_time`` in flat parquet files. None when neither is available (CSV files).
    ``window``: day folders outside it are refused (:func:`event_day_folders`)."""
    directory = Path(directory).expanduser().resolve()
    folders = event_day_folders(directory, window)
    if folders is not None:
        return (min(folders), max(folders)) if folders else None
    files = contract_files(directory, "events", required=False)
    if not files or any(p.suffix.lower() not in (".parquet", ".pq") for p in files):
        return None
    import pyarrow.parquet as pq

    bounds = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "event_time" not in names:
            return None
        column = names.index("event_time")
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max or not isinstance(stats.min, datetime):
                return None
            bounds += [t if t.tzinfo else t.replace(tzinfo=UTC) for t in (stats.min, stats.max)]
    if not bounds:
        return None
    return min(bounds).astimezone(UTC).date(), max(bounds).astimezone(UTC).date()


def delivery_fingerprints(
    directory: Path, known: dict[str, list] | None = None
) -> tuple[dict[str, str], dict[str, list]]:
    """Content digests of a day-folder delivery: ``{"catalog": <items+users>, "<YYYY-MM-DD>": <that day's
    files>}`` (sha256 over names and bytes), and the file table ``{relative path: [size, mtime_ns,
    sha256]}``. A file whose size and mtime match ``known`` is not read again."""
    directory = Path(directory).expanduser().resolve()
    folders = event_day_folders(directory)
    if folders is None:
        raise ContractError(
            str(directory / "events"),
            None,
            None,
            "is not a day-folder delivery (expected events/day=YYYY-MM-DD/ folders)",
        )
    known = known or {}
    table: dict[str, list] = {}

    def digest_of(paths: list[Path]) -> str:
        outer = hashlib.sha256()
        for path in paths:
            rel = str(path.relative_to(directory))
            stat = path.stat()
            cached = known.get(rel)
            if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
                sha = cached[2]
            else:
                inner = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        inner.update(block)
                sha = inner.hexdigest()
            table[rel] = [stat.st_size, stat.st_mtime_ns, sha]
            outer.update(f"{rel}\0{sha}\0".encode())
        return outer.hexdigest()

    catalog = contract_files(directory, "items") + contract_files(directory, "users", required=False)
    digests = {"catalog": digest_of(catalog)}
    for day, folder in folders.items():
        digests[day.isoformat()] = digest_of(day_folder_files(directory, folder))
    return digests, table


def write_event_day(directory: Path, day: date, events: pd.DataFrame, name: str = "part-0.parquet") -> Path:
    """Deliver one day: write ``events`` (all on UTC ``day``) as ``events/day=YYYY-MM-DD/<name>``
    atomically (a temp folder renamed into place), replacing the day's previous files."""
    directory = Path(directory)
    target = directory / "events" / f"day={day.isoformat()}"
    staging = directory / "events" / f".day={day.isoformat()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    events.to_parquet(staging / name, index=False)
    old = directory / "events" / f".day={day.isoformat()}.old"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


# ---- helpers of the checks above ----------------------------------------------------------


def _example(value) -> str:
    """An offending value as an error message shows it (a missing one as <empty>, not nan)."""
    return (
        "<empty>" if value is None or (isinstance(value, float) and value != value) or value is pd.NA else repr(value)
    )


def _require_rows(frame: pd.DataFrame, file: str) -> None:
    if len(frame) == 0:
        raise ContractError(
            _origin(frame, file), None, None, "has no rows: a contract directory needs at least one event"
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


def _check_inside(directory: Path, paths: list[Path]) -> None:
    """A file or folder that resolves outside the contract directory (a symbolic link, itself or any folder
    above it up to the directory) is refused, not read: a contract directory holds its data. Checked on
    every read path, for every file and folder, before it is opened."""
    root = Path(directory).resolve()
    for path in paths:
        target = path.resolve()
        if not target.is_relative_to(root):
            linked = next((p for p in [path, *path.parents] if p.is_symlink()), path)
            raise ContractError(
                str(path),
                None,
                None,
                f"is read through the symbolic link {linked} to {linked.resolve()}, outside the "
                "contract directory: copy the data into the directory instead",
            )
