"""The training methods, one small class each, registered once: what rows a method learns from, with what
label and weight. The evaluation, the logged evaluation, the bias sweep, the reports and the training asset
all read :data:`REGISTRY`; adding a method (a baseline, a GPL variant, a control) is one class here.

A method's :meth:`TrainingMethod.plan` returns a frame of (row into ``train``, label in [0, 1], weight,
is_pseudo). Exposed rows carry their click; unexposed rows, depending on the method, a sampled 0, a teacher's
score or a pseudo-label. Nothing here reads oracle labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd

from gpl_platform.config import TrainingConfig

#: what a method is, for reports and plots: the platform's method, its ablations, the baselines it must beat,
#: and the controls that keep GPL's rows and weights but change only the labels
FAMILIES = ("gpl", "ablation", "baseline", "control")


@dataclass
class TeacherLabels:
    """A teacher's soft labels for every training row, and per-row weights (1 where the teacher gives none)."""

    scores: np.ndarray
    weights: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@dataclass
class PlanInputs:
    """What a method may read: the training days' candidates, the pseudo-labels ("main" and the ablation
    variants, keyed by (request_id, item_id)), the settings, the seed, and what the methods' needs produced
    (a teacher's labels, the logging propensities)."""

    train: pd.DataFrame
    pseudo: dict[str, pd.DataFrame]
    cfg: TrainingConfig
    seed: int
    teachers: dict[str, TeacherLabels] = field(default_factory=dict)
    propensity: np.ndarray | None = None

    @property
    def exposed(self) -> np.ndarray:
        return self.train["exposed"].to_numpy(bool)


Part = tuple[np.ndarray, np.ndarray, np.ndarray, bool]  # rows, labels, weights, is_pseudo


class TrainingMethod:
    """One way to build training rows. Subclasses set ``name`` and ``family`` and override :meth:`parts`."""

    name: ClassVar[str]
    family: ClassVar[str]
    #: which pseudo-label table the method reads ("main" = ``pseudo_labels``, else ``pseudo_labels__<variant>``)
    pseudo_variant: ClassVar[str | None] = None
    #: the teacher it needs fitted first (a key of the evaluation's teacher builders), if any
    teacher: ClassVar[str | None] = None
    needs_propensity: ClassVar[bool] = False
    #: rows of a request depend on no other request (no sampling, teacher or range-wide normalisation), so the
    #: training set can be built a batch of requests at a time
    request_separable: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def parts(self, inputs: PlanInputs) -> list[Part]:
        raise NotImplementedError

    def plan(self, inputs: PlanInputs) -> pd.DataFrame:
        parts = self.parts(inputs)
        return pd.DataFrame(
            {
                "row": np.concatenate([p[0] for p in parts]).astype(np.int64),
                "label": np.concatenate([p[1] for p in parts]).astype(np.float32),
                "weight": np.concatenate([p[2] for p in parts]).astype(np.float32),
                "is_pseudo": np.concatenate([np.full(len(p[0]), p[3]) for p in parts]),
            }
        )

    @staticmethod
    def exposed_part(inputs: PlanInputs, weights: np.ndarray | None = None) -> Part:
        rows = np.flatnonzero(inputs.exposed)
        clicks = inputs.train["clicked"].to_numpy(float)[rows]
        return rows, clicks, np.ones(len(rows)) if weights is None else weights, False


REGISTRY: dict[str, TrainingMethod] = {}


def register(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family {cls.family!r} is not one of {FAMILIES}")
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def method(name: str) -> TrainingMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {tuple(REGISTRY)}") from None


def names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in REGISTRY.items() if family is None or m.family == family)


# ---- baselines ---------------------------------------------------------------------------------


@register
class ExposedOnly(TrainingMethod):
    name, family, request_separable = "exposed_only", "baseline", True
    description = "exposed candidates with their clicks: what a pre-ranker trained on its logs sees"

    def parts(self, inputs):
        return [self.exposed_part(inputs)]


@register
class UnexposedNegative(TrainingMethod):
    name, family = "unexposed_negative", "baseline"
    description = "exposed clicks plus a sample (training.negative_sample_rate) of unexposed candidates as 0"

    def parts(self, inputs):
        unexposed = np.flatnonzero(~inputs.exposed)
        rng = np.random.default_rng(inputs.seed)
        keep = unexposed[rng.random(len(unexposed)) < inputs.cfg.negative_sample_rate]
        return [self.exposed_part(inputs), (keep, np.zeros(len(keep)), np.ones(len(keep)), True)]


@register
class Ips(TrainingMethod):
    name, family, needs_propensity = "ips", "baseline", True
    description = "exposed clicks weighted by the clipped inverse propensity (training.ips_clip), mean 1"

    def parts(self, inputs):
        if inputs.propensity is None:
            raise ValueError("ips needs propensities")
        rows = np.flatnonzero(inputs.exposed)
        w = np.minimum(1.0 / np.maximum(inputs.propensity[rows], 1e-6), inputs.cfg.ips_clip)
        return [self.exposed_part(inputs, w / w.mean())]


class _Distilled(TrainingMethod):
    """Exposed clicks, and the unexposed rows with the teacher's score as a soft label."""

    family = "baseline"

    def parts(self, inputs):
        if self.teacher not in inputs.teachers:
            raise ValueError(f"{self.name} needs the {self.teacher} teacher's labels")
        teacher = inputs.teachers[self.teacher]
        rows = np.flatnonzero(~inputs.exposed)
        weights = np.ones(len(rows)) if teacher.weights is None else teacher.weights[rows]
        return [self.exposed_part(inputs), (rows, teacher.scores[rows], inputs.cfg.distill_weight * weights, True)]


@register
class RankerDistillation(_Distilled):
    name, teacher = "ranker_distillation", "ranker"
    description = "unexposed rows labelled by a ranker trained on exposed clicks (training.distill_weight)"


@register
class Ukd(_Distilled):
    name, teacher = "ukd", "ukd"
    description = (
        "UKD (Xu et al., WWW 2022): a teacher made exposure-invariant by an adversarial exposure discriminator "
        "labels the unexposed rows, weighted by its certainty"
    )


# ---- GPL, its ablations and its controls -----------------------------------------------------------


class _PseudoLabelled(TrainingMethod):
    """Exposed clicks plus GPL's pseudo-labelled unexposed rows, weight lambda x confidence. Subclasses change
    which table, pooling, labels or weights."""

    pseudo_variant = "main"
    pooling: ClassVar[str | None] = None  # None: training.pseudo_label_pooling
    with_exposed: ClassVar[bool] = True

    def labelled_rows(self, inputs: PlanInputs) -> tuple[np.ndarray, np.ndarray]:
        """Training rows that carry a pseudo-label and the row of the label table each one takes."""
        table = inputs.pseudo[self.pseudo_variant]
        keys = pd.MultiIndex.from_frame(inputs.train[["request_id", "item_id"]])
        pos = pd.MultiIndex.from_frame(table[["request_id", "item_id"]]).get_indexer(keys)
        rows = np.flatnonzero(~inputs.exposed & (pos >= 0))
        return rows, pos[rows]

    def labels(self, inputs: PlanInputs, rows: np.ndarray, table: pd.DataFrame, src: np.ndarray) -> np.ndarray:
        pooling = self.pooling or inputs.cfg.pseudo_label_pooling
        column = "pseudo_label_mean_pool" if pooling == "mean" else "pseudo_label"
        return table[column].to_numpy(float)[src]

    def weights(self, inputs: PlanInputs, confidence: np.ndarray) -> np.ndarray:
        return inputs.cfg.pseudo_weight * confidence

    def parts(self, inputs):
        table = inputs.pseudo[self.pseudo_variant]
        rows, src = self.labelled_rows(inputs)
        confidence = table["confidence"].to_numpy(float)[src]
        pseudo = (rows, self.labels(inputs, rows, table, src), self.weights(inputs, confidence), True)
        return [self.exposed_part(inputs), pseudo] if self.with_exposed else [pseudo]


@register
class Gpl(_PseudoLabelled):
    name, family, request_separable = "gpl", "gpl", True
    description = "exposed clicks plus pseudo-labels (training.pseudo_label_pooling), weight lambda x confidence"


@register
class GplNoConfidence(_PseudoLabelled):
    name, family, request_separable = "gpl_no_confidence", "ablation", True
    description = "gpl with weight lambda for every pseudo-label (no confidence)"

    def weights(self, inputs, confidence):
        return np.full(len(confidence), inputs.cfg.pseudo_weight)


@register
class GplMeanPool(_PseudoLabelled):
    name, family, pooling, request_separable = "gpl_mean_pool", "ablation", "mean", True
    description = "gpl on the mean-pooled similarity's label"


@register
class GplMaxPool(_PseudoLabelled):
    name, family, pooling, request_separable = "gpl_max_pool", "ablation", "max", True
    description = "gpl on the max-pooled similarity's label"


@register
class GplHistoryAnchors(_PseudoLabelled):
    name, family, pseudo_variant = "gpl_history_anchors", "ablation", "history"
    description = "gpl with the user's own recent positives as anchors (no generator)"


@register
class GplSid(_PseudoLabelled):
    name, family, pseudo_variant = "gpl_sid", "ablation", "sid"
    description = "gpl with semantic-ID generator anchors"


@register
class PseudoOnly(_PseudoLabelled):
    name, family, with_exposed, request_separable = "pseudo_only", "ablation", False, True
    description = "pseudo-labels alone (weight = confidence), no exposed rows"

    def weights(self, inputs, confidence):
        return confidence


class _Control(_PseudoLabelled):
    """GPL's rows and weights with other labels: what GPL gains over a control comes from which candidate gets
    which label, not from adding unexposed rows at some label level."""

    family = "control"
    #: the groups inside which the control replaces or permutes GPL's labels
    group_by: ClassVar[tuple[str, ...]]
    transform: ClassVar[Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]]

    def labels(self, inputs, rows, table, src):
        labels = super().labels(inputs, rows, table, src)
        groups = inputs.train.iloc[rows][list(self.group_by)]
        codes = groups.groupby(list(self.group_by), sort=False).ngroup().to_numpy()
        rng = np.random.default_rng([inputs.seed, 97])
        return self.transform(labels, codes, rng)


def _group_mean(labels: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sums = np.bincount(codes, weights=labels)
    return (sums / np.bincount(codes))[codes]


def _permuted_within(labels: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``labels`` permuted among the rows of each group (one random key per row, sorted within groups)."""
    order = np.lexsort((rng.random(len(labels)), codes))  # rows grouped, in random order inside a group
    by_group = np.argsort(codes, kind="stable")  # rows grouped, in their own order
    out = np.empty_like(labels, dtype=float)
    out[by_group] = labels[order]
    return out


@register
class GplConstantLabel(_Control):
    name, group_by, transform = "gpl_constant_label", ("day",), staticmethod(_group_mean)
    description = "control: every pseudo-label replaced by its day's mean calibrated label"


@register
class GplUserMeanLabel(_Control):
    name, group_by, transform = "gpl_user_mean_label", ("day", "user_id"), staticmethod(_group_mean)
    description = "control: every pseudo-label replaced by its user's mean label of the day"


@register
class GplRequestPermuted(_Control):
    name, group_by, transform = "gpl_request_permuted", ("request_id",), staticmethod(_permuted_within)
    description = "control: pseudo-labels permuted among the candidates of each request"


@register
class GplShuffledLabels(_Control):
    name, group_by, transform = "gpl_shuffled_labels", ("day",), staticmethod(_permuted_within)
    description = "control: pseudo-labels permuted among all candidates of a day (across users)"
