"""GPL's labelling chain as one object: anchors -> anchor embeddings -> candidate similarities ->
(calibrations) -> pseudo-labels, over the warehouse, for a range of days.

:class:`LabellingChain` is built once (from the settings, the warehouse, the engine, the anchor generator, the
encoder and the stage tables a variant writes) and has one method per stage, each returning a frozen result
(:mod:`.stage_results`). The Dagster assets (main and ablation variants), the scale benchmark and the tests all
run the stages through it, so no caller wires the stage functions and their arguments by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from gpl_platform.config import Settings
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine import Engine
from gpl_platform.pseudo_labels.anchor_stages import anchor_summary, embed_anchors, generate_anchors
from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator
from gpl_platform.pseudo_labels.day_calibration import calibration_for_day
from gpl_platform.pseudo_labels.encoder import Encoder
from gpl_platform.pseudo_labels.pipeline import pseudo_label_days, score_day_candidates
from gpl_platform.pseudo_labels.stage_results import (
    AnchorsResult,
    AnchorSummary,
    ChainResult,
    DayCalibration,
    EmbeddingsResult,
    LabelsResult,
    SimilaritiesResult,
)
from gpl_platform.pseudo_labels.stages import MAIN, POOLINGS, StageSettings, StageTables


@dataclass(frozen=True, eq=False)
class LabellingChain:
    """The four labelling stages of one variant (``tables``) with everything they read. ``run_id`` is
    recorded with every partition written."""

    warehouse: Warehouse
    engine: Engine
    generator: AnchorGenerator
    encoder: Encoder
    settings: StageSettings
    tables: StageTables = MAIN
    run_id: str | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        warehouse: Warehouse,
        engine: Engine,
        generator: AnchorGenerator,
        encoder: Encoder,
        first_day: date,
        *,
        tables: StageTables = MAIN,
        run_id: str | None = None,
    ) -> LabellingChain:
        """The chain of ``settings`` (``first_day``: the timeline's first day, where calibration windows start)."""
        return cls(
            warehouse, engine, generator, encoder, StageSettings.from_settings(settings, first_day), tables, run_id
        )

    # ---- the stages, in order --------------------------------------------------------------------

    def anchors(self, days: Sequence[date], progress: bool = False) -> AnchorsResult:
        """Step 1: K anchors per (day, user) with a request, from the cache or the generator."""
        return generate_anchors(
            self.warehouse,
            days,
            self.generator,
            self.settings.anchors_k,
            self.settings.anchor_history_items,
            progress=progress,
            run_id=self.run_id,
            tables=self.tables,
            engine=self.engine,
        )

    def anchor_summary(self, days: Sequence[date], examples: int = 5) -> AnchorSummary:
        """What the anchors of ``days`` look like (rows, fallbacks, the anchors of the first users)."""
        return anchor_summary(self.warehouse, days, self.tables, examples)

    def embeddings(self, days: Sequence[date]) -> EmbeddingsResult:
        """Step 2: the anchors' vectors in the encoder's space (or the generator's, for semantic IDs)."""
        return embed_anchors(
            self.warehouse,
            days,
            self.encoder,
            run_id=self.run_id,
            tables=self.tables,
            generator=self.generator,
            engine=self.engine,
        )

    def similarities(self, days: Sequence[date]) -> SimilaritiesResult:
        """Step 3: max- and mean-pooled cosine of every candidate to its user's anchors."""
        return score_day_candidates(
            self.warehouse,
            days,
            self.encoder.encoder_id,
            self.generator.lineage_signature(),
            self.run_id,
            tables=self.tables,
            engine=self.engine,
        )

    def calibrations(self, days: Sequence[date]) -> tuple[DayCalibration, ...]:
        """The calibration serving each day in each pooling, fitted (and stored) where it is missing, on
        exposed candidates of earlier days only. :meth:`labels` uses the same ones."""
        encoder_id, signature = self.encoder.encoder_id, self.generator.lineage_signature()
        found = []
        for day in days:
            for pooling in POOLINGS:
                cal = calibration_for_day(
                    self.warehouse,
                    day,
                    self.settings.first_day,
                    self.settings.calibration,
                    pooling,
                    encoder_id,
                    signature,
                    self.settings.artifacts_dir,
                    self.tables,
                )
                found.append(
                    DayCalibration(
                        day=day,
                        pooling=pooling,
                        version=cal.version if cal else "none",
                        n_train=cal.n_train if cal else 0,
                        train_window=" .. ".join(cal.fitted_on.get("train_window", [])) if cal else "",
                    )
                )
        return tuple(found)

    def labels(self, days: Sequence[date], sample_rows: int = 50_000) -> LabelsResult:
        """Step 4: a pseudo-label and confidence for every unexposed candidate of a calibrated day (with a
        hash sample of at most ``sample_rows`` labels for plots)."""
        return pseudo_label_days(
            self.warehouse,
            days,
            self.generator,
            self.encoder.encoder_id,
            self.settings,
            run_id=self.run_id,
            tables=self.tables,
            engine=self.engine,
            sample_rows=sample_rows,
        )

    def run(self, days: Sequence[date], progress: bool = False) -> ChainResult:
        """The four stages in order over ``days``."""
        return ChainResult(
            anchors=self.anchors(days, progress=progress),
            embeddings=self.embeddings(days),
            similarities=self.similarities(days),
            labels=self.labels(days),
        )
