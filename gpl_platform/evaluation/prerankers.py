"""The pre-rankers an evaluation trains, each a shape and the feature service it reads
(`shape[:feature_service]`, settings `evaluation.prerankers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpl_platform.config import EvaluationConfig, TrainingConfig

#: the shape's own features when a pre-ranker is named without a feature service
DEFAULT_SERVICE_OF_SHAPE = {"mlp": "prerank_v2", "two_tower": "prerank_scalar_v2", "cold": "prerank_scalar_v2"}


@dataclass(frozen=True)
class PreRankerSpec:
    """A pre-ranker shape and the feature service it reads."""

    shape: str
    service: str

    @property
    def name(self) -> str:
        return f"{self.shape}:{self.service}"

    @classmethod
    def parse(cls, text: str) -> PreRankerSpec:
        shape, _, service = text.partition(":")
        if shape not in DEFAULT_SERVICE_OF_SHAPE:
            raise ValueError(f"pre-ranker {text!r}: the shape must be one of {sorted(DEFAULT_SERVICE_OF_SHAPE)}")
        return cls(shape, service or DEFAULT_SERVICE_OF_SHAPE[shape])


def preranker_specs(cfg: TrainingConfig, evaluation: EvaluationConfig) -> list[PreRankerSpec]:
    if evaluation.prerankers:
        specs = [PreRankerSpec.parse(text) for text in evaluation.prerankers]
    else:
        specs = [PreRankerSpec(cfg.preranker, cfg.feature_service)]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"evaluation.prerankers names a pre-ranker twice: {[s.name for s in specs]}")
    return specs
