"""Training every method of an evaluation under one seed: one loop for the oracle evaluation and the logged one.

The loop reads the method registry (:mod:`gpl_platform.prerank.methods`): a method's teacher is fitted once per
seed when some method needs it, its propensities come from the log (or an estimate), its rows from its plan.
A method that has nothing to learn from (no pseudo-labelled day, no exposed row for a teacher, one class only)
is skipped with the reason, never trained on nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpl_platform.config import ConfidenceConfig, TrainingConfig
from gpl_platform.prerank import methods as registry
from gpl_platform.prerank.data import exposure_propensity, load_pseudo_labels, rows_from_plan
from gpl_platform.prerank.model import ModelConfig, PreRanker
from gpl_platform.prerank.teachers import (
    catalog_item_categories,
    fit_ranker_teacher,
    ranker_features,
)
from gpl_platform.prerank.train import train_config_from, train_preranker
from gpl_platform.prerank.ukd import fit_ukd_teacher
from gpl_platform.pseudo_labels.confidence import confidence_weights
from gpl_platform.quality.gate import failing_label_days

log = logging.getLogger(__name__)


class NothingToLearn(ValueError):
    """A method has no usable training rows under this split."""


@dataclass
class TrainingData:
    """What every method of one pre-ranker trains and early-stops on: the training days' candidates and their
    feature rows, the validation days' (only exposed clicks are used to stop), and the pseudo-labels of the
    training days."""

    train: pd.DataFrame
    train_x: np.ndarray
    columns: list[str]
    valid: pd.DataFrame
    valid_x: np.ndarray
    pseudo: dict[str, pd.DataFrame]
    cfg: TrainingConfig
    model_config: ModelConfig
    user_vocab: list[str]
    item_vocab: list[str]
    propensity: np.ndarray | None = None
    propensity_kind: str | None = None
    #: item_id -> category from the catalog, for the teachers' user x category features
    item_categories: pd.Series | None = None

    @property
    def exposed(self) -> np.ndarray:
        return self.train["exposed"].to_numpy(bool)


def with_propensity(data: TrainingData, names: Sequence[str]) -> TrainingData:
    """The logging policy's propensities where the log has them for every exposed row; otherwise an estimate from
    the logs (item popularity and request size); only when a method of ``names`` needs them."""
    if not any(registry.method(n).needs_propensity for n in names):
        return data
    logged = (
        data.train["propensity"].to_numpy(float) if "propensity" in data.train else np.full(len(data.train), np.nan)
    )
    if np.isfinite(logged[data.exposed]).all():
        data.propensity, data.propensity_kind = logged, "logged"
    else:
        data.propensity = exposure_propensity(data.train_x, data.columns, data.train)
        data.propensity_kind = "estimated"
    return data


def _exposed_or_nothing(data: TrainingData) -> np.ndarray:
    exposed = data.exposed
    if not exposed.any():
        raise NothingToLearn("no exposed training rows for the teacher")
    return exposed


def ranker_teacher(data: TrainingData, seed: int) -> registry.TeacherLabels:
    """The distillation baseline's teacher: gradient-boosted trees on the student's features plus ranking
    features, trained on the exposed clicks (gpl_platform/prerank/teachers.py)."""
    _exposed_or_nothing(data)
    teacher = fit_ranker_teacher(
        data.train, data.train_x, data.columns, data.valid, data.valid_x, seed, item_categories=data.item_categories
    )
    return registry.TeacherLabels(teacher.scores, info={"valid_auc": teacher.valid_auc, "n_iter": teacher.n_iter})


def ukd_teacher(data: TrainingData, seed: int) -> registry.TeacherLabels:
    """UKD's teacher: exposure-invariant by an adversarial discriminator, its certainty as the rows' weights."""
    exposed = _exposed_or_nothing(data)
    valid_exposed = data.valid["exposed"].to_numpy(bool)
    # on the ranker teacher's inputs, so that the two distillation baselines differ in method only
    train_x, _, encoder = ranker_features(
        data.train, data.train_x, data.columns, exposed, item_categories=data.item_categories, seed=seed
    )
    teacher = fit_ukd_teacher(
        train_x,
        exposed,
        data.train["clicked"].fillna(0).to_numpy(float),
        encoder.transform(data.valid[valid_exposed], data.valid_x[valid_exposed]),
        data.valid.loc[valid_exposed, "clicked"].to_numpy(int),
        seed,
        threads=data.cfg.torch_threads,
    )
    info = {"valid_auc": teacher.valid_auc, "discriminator_auc": teacher.discriminator_auc}
    return registry.TeacherLabels(teacher.scores, teacher.weights, info)


#: how each teacher a method may name is fitted (once per seed, only when a method needs it)
TEACHERS: dict[str, Callable[[TrainingData, int], registry.TeacherLabels]] = {
    "ranker": ranker_teacher,
    "ukd": ukd_teacher,
}


def gated_pseudo_labels(
    warehouse, train_days: Sequence, valid_days: Sequence, names: Sequence[str], label_gate
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """The pseudo-labels (main and the variants the methods ``names`` read) of the training and validation days,
    and per variant the training days refused: the same quality gate as training_set, failing days are not
    consumed."""
    refused: dict[str, list[str]] = {}
    pseudo = {}
    variants = ["main"] + [registry.method(n).pseudo_variant for n in names if registry.method(n).pseudo_variant]
    days = list(train_days) + list(valid_days)
    for variant in dict.fromkeys(variants):
        table = "pseudo_labels" if variant == "main" else f"pseudo_labels__{variant}"
        failing = failing_label_days(warehouse, days, label_gate, table=table)
        refused[variant] = sorted(str(d) for d in failing if d in set(train_days))
        pseudo[variant] = load_pseudo_labels(warehouse, [d for d in days if d not in failing], table)
    return pseudo, refused


def fit_plan(data: TrainingData, plan: pd.DataFrame, seed: int, cfg: TrainingConfig | None = None):
    """Train one pre-ranker on ``plan``'s rows (with ``cfg``, default the data's), early-stopped on the validation
    days' exposed clicks."""
    cfg, valid = cfg or data.cfg, data.valid
    valid_exposed = valid["exposed"].to_numpy(bool)
    return train_preranker(
        rows_from_plan(plan, data.train_x, data.train),
        data.columns,
        data.valid_x[valid_exposed],
        valid.loc[valid_exposed, "clicked"].to_numpy(int),
        data.model_config,
        train_config_from(cfg, seed),  # one budget for every method
        valid_user_ids=valid.loc[valid_exposed, "user_id"].to_numpy(),
        valid_item_ids=valid.loc[valid_exposed, "item_id"].to_numpy(),
        user_vocab=data.user_vocab,
        item_vocab=data.item_vocab,
    )


def _why_no_labels(refused_days: list[str]) -> str:
    if refused_days:
        return f" (the blocking gate refused {len(refused_days)} training day(s) of pseudo-labels)"
    return " (no training day has pseudo-labels, e.g. no calibration yet: too few exposed clicks before them)"


@dataclass
class MethodConfig:
    """One method's own settings in an evaluation (a tuned configuration): training settings, and the confidence
    exponents its pseudo-labels' weights are recomputed with (None: as stored)."""

    training: TrainingConfig
    confidence: ConfidenceConfig | None = None


def with_confidence(pseudo: dict[str, pd.DataFrame], confidence: ConfidenceConfig | None) -> dict[str, pd.DataFrame]:
    """The pseudo-labels with every weight recomputed from its stored factors under ``confidence``."""
    if confidence is None:
        return pseudo
    return {
        name: frame.assign(
            confidence=confidence_weights(
                frame["c_coherence"],
                frame["c_history"],
                frame["c_generation"],
                confidence.alpha,
                confidence.beta,
                confidence.gamma,
                confidence.w_min,
            )
        )
        for name, frame in pseudo.items()
    }


def train_methods(
    data: TrainingData,
    names: Sequence[str],
    seed: int,
    skipped: dict[str, str],
    refused: dict[str, list[str]],
    configs: Mapping[str, MethodConfig] | None = None,
) -> Iterator[tuple[str, PreRanker, dict]]:
    """Each method of ``names`` trained under ``seed``, as (name, model, training history), with its own
    configuration where ``configs`` has one; a method with nothing to learn from is recorded in ``skipped``
    with the reason (and skipped under later seeds too)."""
    teachers: dict[str, registry.TeacherLabels] = {}
    configs = configs or {}
    for name in names:
        if name in skipped:
            continue
        method = registry.method(name)
        own = configs.get(name, MethodConfig(data.cfg))
        try:
            if method.teacher and method.teacher not in teachers:
                teachers[method.teacher] = TEACHERS[method.teacher](data, seed)
            pseudo = with_confidence(data.pseudo, own.confidence) if method.pseudo_variant else data.pseudo
            inputs = registry.PlanInputs(data.train, pseudo, own.training, seed, teachers, data.propensity)
            plan = method.plan(inputs)
            if plan.empty or plan["label"].nunique() < 2:
                raise NothingToLearn(
                    ("no training rows" if plan.empty else "training rows of one class only")
                    + (_why_no_labels(refused.get(method.pseudo_variant, [])) if method.pseudo_variant else "")
                )
            if method.pseudo_variant and not plan["is_pseudo"].any():
                # without a pseudo-label it is exposed_only under another name: a tie that measures nothing
                raise NothingToLearn(
                    "no pseudo-labelled training rows" + _why_no_labels(refused.get(method.pseudo_variant, []))
                )
        except NothingToLearn as exc:
            skipped[name] = str(exc)
            log.warning("%s skipped: %s", name, exc)
            continue
        model, history = fit_plan(data, plan, seed, own.training)
        yield name, model, history


def item_categories(warehouse) -> pd.Series | None:
    """``item_id -> category`` of the catalog's categorical attribute with the fewest values (the teachers'
    user x category features), None without one."""
    return catalog_item_categories(warehouse.query("SELECT * FROM items"))
