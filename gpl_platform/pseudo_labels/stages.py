"""What every per-day GPL stage shares: where a variant of the stages writes (:class:`StageTables`), the
settings the stages read (:class:`StageSettings`), the days as a DuckDB parameter, and the check that upstream
partitions exist."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from gpl_platform.config import CalibrationConfig, ConfidenceConfig, Settings
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import Warehouse

POOLINGS = ("max", "mean")
STAGE_TABLES = ("user_anchors", "anchor_embeddings", "candidate_similarities", "pseudo_labels")
# the SQL condition on a stage's registered ``_days`` (see :func:`days_param`)
IN_DAYS = "day IN (SELECT CAST(day AS DATE) FROM _days)"


@dataclass(frozen=True)
class StageTables:
    """Where a variant of the GPL stages writes. ``main`` is the configured generator; an ablation
    variant (e.g. ``history`` anchors) gets tables of the same schema with a suffix."""

    variant: str = "main"

    def __post_init__(self) -> None:
        if not self.variant.isidentifier():
            raise ValueError(f"variant {self.variant!r} must be an identifier")

    def name(self, base: str) -> str:
        return base if self.variant == "main" else f"{base}__{self.variant}"

    @property
    def anchors(self) -> str:
        return self.name("user_anchors")

    @property
    def embeddings(self) -> str:
        return self.name("anchor_embeddings")

    @property
    def similarities(self) -> str:
        return self.name("candidate_similarities")

    @property
    def labels(self) -> str:
        return self.name("pseudo_labels")

    def ensure(self, warehouse: Warehouse) -> None:
        if self.variant == "main":
            return
        with warehouse.transaction() as con:
            for base in STAGE_TABLES:
                con.execute(f'CREATE TABLE IF NOT EXISTS "{self.name(base)}" AS SELECT * FROM "{base}" WHERE false')


MAIN = StageTables()
NO_HISTORY_RULES = ("none", "population")


@dataclass(frozen=True)
class StageSettings:
    """What the labelling stages read from the settings, and ``first_day``, the first day of the timeline
    (where calibration windows start)."""

    first_day: date
    anchors_k: int  # anchors.k
    anchor_history_items: int  # anchors.history_max_items: what the generator reads
    label_history_items: int  # history_max_len: what the history-consistency factor reads
    calibration: CalibrationConfig
    confidence: ConfidenceConfig
    artifacts_dir: Path
    no_history: str = "none"  # pseudo_labels.no_history: "none" or "population"

    def __post_init__(self) -> None:
        if self.no_history not in NO_HISTORY_RULES:
            raise ValueError(f"no_history must be one of {NO_HISTORY_RULES}, not {self.no_history!r}")

    @classmethod
    def from_settings(cls, settings: Settings, first_day: date) -> StageSettings:
        return cls(
            first_day=first_day,
            anchors_k=settings.anchors.k,
            anchor_history_items=settings.anchors.history_max_items,
            label_history_items=settings.history_max_len,
            calibration=settings.calibration,
            confidence=settings.confidence,
            artifacts_dir=settings.artifacts_dir,
            no_history=settings.pseudo_labels.no_history,
        )

    @property
    def segments(self) -> tuple[str, ...]:
        """The calibration segments the labels use: users with a history, and without one under "population"."""
        return ("history", "no_history") if self.no_history == "population" else ("history",)


def days_param(days: Sequence[date]) -> pd.DataFrame:
    return pd.DataFrame({"day": pd.to_datetime(pd.Series(sorted(set(days)), dtype="object"))})


def as_date(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series).dt.date


def require_days(warehouse: Warehouse, table: str, days: Sequence[date], purpose: str) -> None:
    missing = sorted(set(days) - warehouse.written_days(table))
    if missing:
        raise MissingUpstreamDays(
            f"{purpose} needs `{table}` for {len(missing)} day(s) that are not materialized "
            f"(first: {missing[0]}, last: {missing[-1]}). Materialize {table} for those partitions first."
        )
