"""Batches in DuckDB: cutting a stage's rows into batches of whole users (or requests), and writing a
batch's output back. The data layer's, so that ingestion, the labelling stages and the training sets share
it without depending on the engine that runs the batches."""

from __future__ import annotations

import duckdb

BATCH_OUTPUT = "batch_output"


def insert_batch(relation: duckdb.DuckDBPyRelation, insert_sql: str) -> None:
    """Run ``insert_sql``, which reads the relation as ``batch_output``. The relation is not registered on
    the connection: inside a transaction DuckDB keeps every registered object alive until the commit,
    so registering each batch would hold the whole range's outputs in memory."""
    relation.query(BATCH_OUTPUT, insert_sql)


PLAN_TABLE = "_gpl_plan"


def plan_user_batches(con, counts_sql: str, batch_rows: int, key: str = "user_id") -> int:
    """Cut the (day, ``key``, n) rows of ``counts_sql`` into batches of about ``batch_rows`` rows, in
    (day, ``key``) order, never splitting a (day, key) pair (a user's or a request's candidates of a day).
    Creates the temp table ``_gpl_plan`` (day, key, n, user_code, batch): ``user_code`` numbers the pairs
    0..U-1 in that order (the integer key every batch input joins on). Returns the number of batches."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {PLAN_TABLE} AS
        SELECT day, {key}, n, (row_number() OVER w - 1)::BIGINT AS user_code,
               ((sum(n) OVER w - n) // {int(batch_rows)})::BIGINT AS batch
        FROM ({counts_sql}) WINDOW w AS (ORDER BY day, {key} ROWS UNBOUNDED PRECEDING)""")
    # batch numbers are increasing but may skip values (one user larger than a batch): renumber densely
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {PLAN_TABLE} AS
        SELECT day, {key}, n, user_code, (dense_rank() OVER (ORDER BY batch) - 1)::BIGINT AS batch
        FROM {PLAN_TABLE}""")
    return int(con.execute(f"SELECT coalesce(max(batch) + 1, 0) FROM {PLAN_TABLE}").fetchall()[0][0])
