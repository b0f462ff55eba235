"""The label digest `gpl bench scale` compares engines with: computed in DuckDB, independent of row order,
blind below its rounding (1e-9) and sensitive above it."""

from datetime import date

import pytest

from bench.scale_stages import label_digest
from gpl_platform.data.warehouse import Warehouse

ROWS = [
    (date(2024, 1, 1), "r1", "i1", "a1", 0.25, 0.30, 0.9),
    (date(2024, 1, 1), "r1", "i2", "a2", 0.75, 0.60, 0.5),
    (date(2024, 1, 2), "r2", "i1", None, 0.10, 0.20, 0.05),
]


def _digest(tmp_path, rows, name: str) -> str:
    warehouse = Warehouse(tmp_path / f"{name}.duckdb")
    with warehouse.transaction() as con:
        con.execute(
            "CREATE TABLE labels (day DATE, request_id VARCHAR, item_id VARCHAR, anchor_id VARCHAR, "
            "pseudo_label DOUBLE, pseudo_label_mean_pool DOUBLE, confidence DOUBLE)"
        )
        con.executemany("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return label_digest(warehouse, "labels")


def test_the_digest_ignores_row_order_and_sub_rounding_noise(tmp_path):
    base = _digest(tmp_path, ROWS, "base")
    assert _digest(tmp_path, list(reversed(ROWS)), "reversed") == base
    noisy = [(*r[:4], r[4] + 1e-12, r[5], r[6]) for r in ROWS]
    assert _digest(tmp_path, noisy, "noisy") == base


@pytest.mark.parametrize("column", [4, 5, 6])
def test_the_digest_changes_with_a_label_or_a_confidence(tmp_path, column):
    changed = [list(r) for r in ROWS]
    changed[1][column] += 1e-6
    assert _digest(tmp_path, [tuple(r) for r in changed], "changed") != _digest(tmp_path, ROWS, "base")


def test_the_digest_changes_with_a_missing_or_extra_row(tmp_path):
    base = _digest(tmp_path, ROWS, "base")
    assert _digest(tmp_path, ROWS[:2], "fewer") != base
    assert _digest(tmp_path, [*ROWS, ROWS[0]], "duplicate") != base
