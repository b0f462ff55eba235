"""Errors of the data contract: which file, column and how many rows offend (docs/DATA_CONTRACT.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd

ORIGIN = "__origin_file"  # per-row source file name, kept only while validating


class ContractError(ValueError):
    """Input that breaks the data contract. Names the file, column and offending row count."""

    def __init__(self, file: str, column: str | None, n_rows: int | None, problem: str, examples: list | None = None):
        self.file, self.column, self.n_rows, self.problem = file, column, n_rows, problem
        where = f"{file}: column '{column}'" if column else f"{file}"
        count = f": {n_rows} row(s) {problem}" if n_rows is not None else f": {problem}"
        ex = f" (e.g. {', '.join(map(_example, examples[:3]))})" if examples else ""
        super().__init__(where + count + ex)


def origin_file(df: pd.DataFrame, default: str, mask: pd.Series | np.ndarray | None = None) -> str:
    """The file(s) the offending rows came from, for error messages."""
    if ORIGIN not in df:
        return default
    files = df.loc[mask, ORIGIN] if mask is not None else df[ORIGIN]
    names = sorted(set(files.dropna().astype(str)))
    if not names:
        return default
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more files)"


def fail_rows(df, file, column, mask, problem) -> None:
    """Raise a :class:`ContractError` naming how many rows of ``column`` match ``mask`` (nothing if none)."""
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    if n:
        examples = df.loc[mask, column].head(3).tolist() if column in df else None
        raise ContractError(origin_file(df, file, mask), column, n, problem, examples)


def _example(value) -> str:
    """An offending value as an error message shows it (a missing one as <empty>, not nan)."""
    return (
        "<empty>" if value is None or (isinstance(value, float) and value != value) or value is pd.NA else repr(value)
    )
