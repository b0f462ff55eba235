"""A delivered day's events (``events/day=YYYY-MM-DD/``) read and validated a chunk of whole requests at a time.

:func:`~gpl_platform.data.delivery.read_contract_dir` validates a day as one pandas frame, so a day of a large
traffic costs its size in memory (1.5 GB for 2.7M events). Here DuckDB reads the day's parquet files once per
chunk and keeps the rows whose request id hashes to that chunk (a bounded scan), and each chunk goes through
the same contract validation: every rule is about a row or about one request (one row per (request, item), one
user and one time per request), and a chunk holds whole requests, so the chunks pass or fail as the day would.
Only the count in an error message is the first failing chunk's, not the day's. A day of CSV files is read
whole, as before (DuckDB's CSV typing is not pandas', which the contract's CSV rules follow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from gpl_platform.data.contract import (
    ORIGIN,
    ContractError,
    normalize_events_frame,
    validate_events,
    validate_items,
    validate_users,
)
from gpl_platform.data.delivery import (
    check_column_names,
    check_day_folders,
    check_event_times,
    day_folder_files,
    event_day_folders,
    plausible_time_window,
    read_contract_table,
    read_event_days,
)
from gpl_platform.data.policies import DEFAULT_POLICIES, LoggingPolicies
from gpl_platform.data.sql import quote_identifier, quote_literal

# A delivery is read once per pass: DuckDB's cache of file blocks (up to its memory limit) would only hold memory.
_READER_CONFIG = {"enable_external_file_cache": False}


def contract_catalog(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The validated items and users (None without a users table) of a contract directory."""
    items, items_file = read_contract_table(directory, "items")
    users, users_file = read_contract_table(directory, "users", required=False)
    items = validate_items(items, items_file).drop(columns=[ORIGIN], errors="ignore")
    if users is not None:
        users = validate_users(users, users_file).drop(columns=[ORIGIN], errors="ignore")
    return items, users


def delivered_event_chunks(
    directory: Path,
    days: Sequence[date],
    chunk_rows: int,
    time_window: tuple[datetime, datetime] | None = None,
    memory_limit: str = "1GB",
    policies: LoggingPolicies = DEFAULT_POLICIES,
) -> Iterator[tuple[date, Iterator[pd.DataFrame]]]:
    """For each of the delivered ``days`` in order: the day and its validated, normalized events (columns of
    ``Dataset.events``), about ``chunk_rows`` rows at a time, each chunk whole requests (nothing when the day has
    no folder). The catalog is validated once, first; consume a day's chunks before asking for the next day.
    Raises :class:`ContractError` like :func:`read_contract_dir` does."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    directory = Path(directory).expanduser().resolve()
    folders = event_day_folders(directory)
    if folders is None:
        raise ContractError(str(directory), None, None, "has no events/day=YYYY-MM-DD/ folders to read by day")
    items, users = contract_catalog(directory)
    window = time_window or plausible_time_window()
    for day in days:
        yield day, _day_chunks(directory, folders, day, items, users, chunk_rows, window, memory_limit, policies)


def _day_chunks(
    directory, folders, day, items, users, chunk_rows, window, memory_limit, policies
) -> Iterator[pd.DataFrame]:
    if day not in folders:
        return
    files = day_folder_files(directory, folders[day])
    label = f"{directory / 'events'}/ ({len(files)} files of 1 day folders)"
    if any(f.suffix.lower() == ".csv" for f in files):
        frames = [read_event_days(directory, folders, [day])[0]]
    else:
        frames = _parquet_chunks(directory, files, chunk_rows, memory_limit, label)
    for frame in frames:
        events = validate_events(frame, items, users, label, require_rows=False, policies=policies)
        origins = events.pop(ORIGIN).to_numpy()
        events = normalize_events_frame(events)
        check_event_times(events, origins, window, label)
        check_day_folders(events, origins)
        yield events


def _parquet_chunks(
    directory: Path, files: list[Path], chunk_rows: int, memory_limit: str, label: str
) -> Iterator[pd.DataFrame]:
    """The rows of ``files`` in ceil(rows / chunk_rows) parts by a hash of their request id, each as pandas
    reads a parquet file (the first file's pandas metadata restores its dtypes), with the file of every row."""
    schemas, rows = [], 0
    for path in files:
        try:
            metadata = pq.read_metadata(path)
        except Exception as exc:  # unreadable file: say which one, as a whole-day read does
            raise ContractError(str(path), None, None, f"cannot be read as parquet: {exc}") from exc
        schema = metadata.schema.to_arrow_schema()
        check_column_names([n for n in schema.names if not n.startswith("__index_level_")], str(path))
        schemas.append(schema)
        rows += metadata.num_rows
    if len({tuple(sorted(s.names)) for s in schemas}) > 1:
        raise ContractError(label, None, None, "files of one table have different columns")
    columns = [c for c in schemas[0].names if not c.startswith("__index_level_")]
    # without a request_id column one part holds everything, and validation names the missing column
    parts = max(1, math.ceil(rows / chunk_rows)) if "request_id" in columns else 1
    paths = [str(f) for f in files]
    relative = {str(f): str(f.relative_to(directory)) for f in files}
    # The column names come from the delivered files: quoted, never pasted (ORIGIN itself is a refused name).
    select = ", ".join(map(quote_identifier, [*columns, ORIGIN]))
    with duckdb.connect(config=_READER_CONFIG | {"memory_limit": memory_limit}) as con:
        for part in range(parts):
            where = f"WHERE hash(request_id) % {parts} = {part}" if parts > 1 else ""
            try:
                table = con.sql(
                    f"SELECT {select} FROM read_parquet(?, filename = {quote_literal(ORIGIN)}, union_by_name = true) "
                    + where,
                    params=[paths],
                ).to_arrow_table()
            except duckdb.Error as exc:  # a damaged page: the footer read, the data did not
                raise ContractError(label, None, None, f"cannot be read as parquet: {exc}") from exc
            frame = table.replace_schema_metadata(schemas[0].metadata).to_pandas().reset_index(drop=True)
            frame[ORIGIN] = frame[ORIGIN].map(relative)
            yield frame


def delivered_item_ids(directory: Path, memory_limit: str = "1GB") -> set[str]:
    """Every item id the events of a day-folder delivery name (all its days, the ``item_id`` column only), so
    that a new catalog can be checked against them before it replaces the old one. A file that cannot be read
    is left out: its own day's run refuses it."""
    directory = Path(directory).expanduser().resolve()
    folders = event_day_folders(directory) or {}
    files = [f for folder in folders.values() for f in day_folder_files(directory, folder)]
    ids: set[str] = set()
    parquet = [f for f in files if f.suffix.lower() != ".csv"]
    with duckdb.connect(config=_READER_CONFIG | {"memory_limit": memory_limit}) as con:
        for group in ([parquet] if parquet else []) + [[f] for f in files if f.suffix.lower() == ".csv"]:
            try:
                ids.update(_item_ids(con, group))
            except (duckdb.Error, ValueError, OSError):
                if len(group) == 1:
                    continue
                for path in group:  # a bad file among many: read the others one by one
                    try:
                        ids.update(_item_ids(con, [path]))
                    except (duckdb.Error, ValueError, OSError):
                        continue
    return ids


def _item_ids(con, files: list[Path]) -> list[str]:
    if files[0].suffix.lower() == ".csv":
        return pd.read_csv(files[0], usecols=["item_id"], dtype=str, keep_default_na=False)["item_id"].tolist()
    query = "SELECT DISTINCT CAST(item_id AS VARCHAR) FROM read_parquet(?, union_by_name = true)"
    return [row[0] for row in con.execute(query, [[str(f) for f in files]]).fetchall()]
