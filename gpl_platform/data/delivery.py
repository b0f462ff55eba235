"""Reading a contract directory: its table files (parquet or CSV, one format per table), the day folders of a
daily delivery (``events/day=YYYY-MM-DD/``), the plausible time window, the first day without reading rows,
and the content digests of what was delivered. Nothing is read from outside the directory (links are refused
at every depth). What the tables must hold, and their validation: :mod:`gpl_platform.data.contract`.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.data.contract import (
    EVENT_REQUIRED,
    ORIGIN,
    RESERVED_COLUMNS,
    ContractError,
    Dataset,
    origin_file,
    validate_dataset,
)
from gpl_platform.data.policies import DEFAULT_POLICIES, LoggingPolicies

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
    directory: Path,
    days: Sequence[date] | None = None,
    time_window: tuple[datetime, datetime] | None = None,
    policies: LoggingPolicies = DEFAULT_POLICIES,
) -> Dataset:
    """Read and validate a contract directory.

    ``days``: with the day-folder layout, read only these days' folders (a daily run reads one day,
    not the whole history); ignored for the flat layout. ``time_window``: event times outside
    [start, end) are refused with the offending rows named (default: :func:`plausible_time_window`).
    ``policies``: the logging-policy names the events may use."""
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
        policies=policies,
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
            origin_file(frame, file, bad),
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
            origin_file(frame, "events", bad),
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
