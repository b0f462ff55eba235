"""What a quality suite returns: one outcome per expectation, the suite's result, the gate's error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class ExpectationOutcome:
    name: str  # our short rule name, e.g. "confidence_mean"
    expectation: str  # GX expectation type, or "custom"
    column: str | None
    passed: bool
    observed: Any = None
    expected: str = ""
    # rows a row-level rule judged (GX's element count less its missing count); None for aggregate rules.
    # It is what lets the outcomes of chunks of one partition add up (merge_chunk_outcomes).
    checked: int | None = None

    def describe(self) -> str:
        return f"{self.name}: observed {format_value(self.observed)}, expected {self.expected}"


@dataclass
class QualityResult:
    suite: str
    passed: bool
    expectations: list[ExpectationOutcome] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why the suite did not apply (passes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.passed]

    def summary(self) -> str:
        if self.skipped:
            return f"{self.suite}: skipped ({self.skipped})"
        if self.passed:
            return f"{self.suite}: {len(self.expectations)} expectations passed"
        return f"{self.suite}: " + "; ".join(e.describe() for e in self.failures)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"rule": e.name, "passed": e.passed, "observed": format_value(e.observed), "expected": e.expected}
                for e in self.expectations
            ],
            columns=["rule", "passed", "observed", "expected"],
        )


class QualityGateError(RuntimeError):
    """Raised by :func:`require_label_days` when days fail the pseudo-label gate."""


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, dict) and "values" in value:
        return "[" + ", ".join(format_value(v) for v in value["values"]) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    return value
