"""Feature parquet files: the Feast offline sources.

Layout: ``<sources_dir>/<view>/<YYYY-MM-DD>.parquet`` (one file per day partition) and
``<sources_dir>/<view>/static.parquet`` for static views; Feast reads ``<view>/*.parquet``.
Each file is written to a hidden temp name and renamed into place, so a re-run replaces a day
whole and a reader never sees half a file. Arrow types are explicit: keys ``string``, event time
``timestamp[us, tz=UTC]`` (DuckDB 2.0 cannot cast ns/tz in materialize), Int64 ``int64``, Float64
``float64``, String ``string``, Array(Float32) ``list<float32>`` (so offline and online dtypes agree).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gpl_platform.features.schema import EMB, FLOAT, INT, TIMESTAMP_FIELD

ARROW_TYPES = {
    INT: pa.int64(),
    FLOAT: pa.float64(),
    "Float32": pa.float32(),
    "String": pa.string(),
    EMB: pa.list_(pa.float32()),
}
STATIC_FILE = "static.parquet"


def view_dir(sources_dir: Path, view: str) -> Path:
    return Path(sources_dir) / view


def arrow_schema(key: str, features: dict[str, str]) -> pa.Schema:
    fields = [
        pa.field(key, pa.string(), nullable=False),
        pa.field(TIMESTAMP_FIELD, pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    fields += [pa.field(name, ARROW_TYPES[dtype]) for name, dtype in features.items()]
    return pa.schema(fields)


def _array(values: pd.Series, dtype: str, n: int) -> pa.Array:
    if dtype == EMB:
        vecs = [np.asarray(v, dtype=np.float32) for v in values]
        if not vecs:
            return pa.array([], type=pa.list_(pa.float32()))
        lengths = np.array([len(v) for v in vecs], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        flat = np.concatenate(vecs) if lengths.sum() else np.zeros(0, np.float32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))
    if dtype == INT:
        return pa.array(pd.array(values, dtype="Int64"), type=pa.int64())
    if dtype == FLOAT:
        return pa.array(values.astype("float64"), type=pa.float64(), from_pandas=True)
    return pa.array(values.astype(object).where(values.notna(), None), type=pa.string())


def to_arrow(frame: pd.DataFrame, key: str, features: dict[str, str]) -> pa.Table:
    schema = arrow_schema(key, features)
    ts = pd.to_datetime(frame[TIMESTAMP_FIELD], utc=True).astype("datetime64[us, UTC]")
    arrays = [pa.array(frame[key].astype(str), type=pa.string()), pa.array(ts, type=pa.timestamp("us", tz="UTC"))]
    arrays += [_array(frame[name], dtype, len(frame)) for name, dtype in features.items()]
    return pa.Table.from_arrays(arrays, schema=schema)


@contextmanager
def _replaced_atomically(path: Path) -> Iterator[Path]:
    """A hidden temp path beside ``path``, renamed onto it when the block succeeds and removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(table: pa.Table, path: Path) -> Path:
    with _replaced_atomically(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_day_chunks(
    chunks: Iterable[pd.DataFrame], sources_dir: Path, view: str, key: str, features: dict[str, str], day: date
) -> int:
    """The file of ``day`` written from ``chunks`` (frames of that day), one chunk in memory at a time, then
    renamed into place (no chunk: an empty file with the schema). Returns its rows."""
    rows = 0
    with _replaced_atomically(view_dir(sources_dir, view) / f"{day.isoformat()}.parquet") as tmp:
        with pq.ParquetWriter(tmp, arrow_schema(key, features), compression="zstd") as writer:
            for frame in chunks:
                other = set(frame["day"]) - {day}
                if other:
                    raise ValueError(f"{view}: rows of {sorted(other)[:3]} in the file of {day}")
                writer.write_table(to_arrow(frame, key, features))
                rows += len(frame)
    return rows


def write_day_partitions(
    frame: pd.DataFrame, sources_dir: Path, view: str, key: str, features: dict[str, str], days: Sequence[date]
) -> dict[date, int]:
    """One file per day of ``days`` (empty days get an empty file with the schema). Returns rows per day."""
    counts = {}
    by_day = {d: g for d, g in frame.groupby("day")} if len(frame) else {}
    for day in sorted(set(days)):
        part = by_day.get(day, frame.iloc[0:0])
        write_atomic(to_arrow(part, key, features), view_dir(sources_dir, view) / f"{day.isoformat()}.parquet")
        counts[day] = len(part)
    return counts


def write_static(frame: pd.DataFrame, sources_dir: Path, view: str, key: str, features: dict[str, str]) -> Path:
    return write_atomic(to_arrow(frame, key, features), view_dir(sources_dir, view) / STATIC_FILE)


def written_days(sources_dir: Path, view: str) -> set[date]:
    out = set()
    for p in view_dir(sources_dir, view).glob("*.parquet"):
        try:
            out.add(date.fromisoformat(p.stem))
        except ValueError:
            continue
    return out
