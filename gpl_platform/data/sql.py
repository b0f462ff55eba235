"""Quoting for the few SQL texts that cannot take a bound parameter (identifiers, paths in COPY/ATTACH).

Names and paths that come from data (a delivered file's column names, a configured path) reach DuckDB only
through these: a double quote in a column name is doubled, never ends the identifier, and a NUL byte,
which DuckDB's parser cuts the text at, is refused.
"""

from __future__ import annotations


def _no_nul(text: str, what: str) -> str:
    text = str(text)
    if "\x00" in text:
        raise ValueError(f"{what} {text!r} contains a NUL byte")
    return text


def quote_identifier(name: str) -> str:
    """``name`` as a SQL identifier: ``vendor"note`` -> ``"vendor""note"``."""
    return '"' + _no_nul(name, "identifier").replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a SQL string literal: ``O'Brien`` -> ``'O''Brien'``."""
    return "'" + _no_nul(value, "string").replace("'", "''") + "'"
