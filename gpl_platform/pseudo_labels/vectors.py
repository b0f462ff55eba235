"""Moving float32 matrices in and out of DuckDB list columns without Python loops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa


def vector_column(matrix: np.ndarray) -> pa.Array:
    """(n, d) float32 -> an Arrow list<float32> column DuckDB stores as FLOAT[]."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel()))


def frame_with_vectors(frame: pd.DataFrame, matrix: np.ndarray, column: str = "vector") -> pa.Table:
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    return table.append_column(column, vector_column(matrix))


def read_vectors(
    con, sql: str, params: Sequence | None = None, column: str = "vector"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Run ``sql``; return the other columns as a DataFrame and ``column`` as an (n, d) matrix."""
    table = con.sql(sql, params=list(params or [])).to_arrow_table()
    vectors = table.column(column).combine_chunks()
    meta = table.drop_columns([column]).to_pandas()
    if len(vectors) == 0:
        return meta, np.zeros((0, 0), dtype=np.float32)
    flat = np.asarray(vectors.flatten(), dtype=np.float32)
    return meta, flat.reshape(len(vectors), -1)
