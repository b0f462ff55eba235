"""The UKD teacher of the ``ukd`` baseline (after Xu et al., WWW 2022, "UKD: Debiasing Conversion Rate
Estimation via Uncertainty-regularized Knowledge Distillation"): an MLP whose shared representation feeds a
click head (trained on exposed rows) and, through a gradient-reversal layer, an exposed-vs-unexposed
discriminator (trained on all rows). The encoder is pushed to make exposure unpredictable, so what the click
head learned on exposed rows transfers to unexposed ones. Its mean score over MC-dropout passes is the soft
label of an unexposed row, and the passes' variance lowers the row's weight (``exp(-variance / temperature)``,
normalized to mean 1 over the unexposed rows). The paper models the uncertainty inside the student; here it is
the teacher's, so the student keeps its usual trainer. The ranker teacher and how the evaluation uses both:
:mod:`gpl_platform.prerank.teachers`.

Nothing here reads oracle labels: only exposed clicks and the validation days' exposed clicks.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F

from gpl_platform.engine.threads import torch_threads
from gpl_platform.prerank.teachers import auc_or_nan

log = logging.getLogger(__name__)

TEMPERATURE_QUANTILE = 0.9  # default UKD temperature: this quantile of the unexposed rows' MC variance


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-strength`` backward: the discriminator learns to tell
    exposed from unexposed while the encoder below it learns to make that impossible."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


class _UkdNet(nn.Module):
    """Shared encoder -> click head, and encoder -> gradient reversal -> exposure discriminator.

    Dropout only comes after the first layer, so MC-dropout passes compute that (widest) layer once
    (:meth:`first_layer`) and redraw only the cheap stochastic rest."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.first = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU())
        self.rest = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
        self.click_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.discriminator = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        # the counts are heavy-tailed: signed log1p before standardizing (as the pre-ranker does)
        return self.first((torch.sign(x) * torch.log1p(x.abs()) - self.mean) / self.std)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first_layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.click_head(self.represent(x)).squeeze(-1)

    def click_from_first(self, h: torch.Tensor) -> torch.Tensor:
        return self.click_head(self.rest(h)).squeeze(-1)


@dataclass
class UkdSettings:
    hidden: int = 64
    dropout: float = 0.2
    adv_weight: float = 1.0  # gradient-reversal strength after the ramp; 0: the discriminator cannot shape the encoder
    ramp_steps: int = 200  # the reversal grows from 0 to adv_weight over these steps (DANN's schedule)
    discriminator_steps: int = 2  # adversary-only updates on each batch before the joint step
    steps: int = 1500  # maximum optimizer steps
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-5
    eval_every: int = 50
    patience: int = 6  # evaluations without a better validation AUC before stopping
    mc_passes: int = 20
    temperature: float | None = None  # None: the unexposed rows' MC variance at TEMPERATURE_QUANTILE
    probe_rows: int = 10000  # at most this many rows, half exposed, probe the final representation
    threads: int | None = 1  # torch intra-op threads while fitting (None: leave torch's setting)


@dataclass
class UkdTeacher:
    """What :func:`fit_ukd_teacher` gives the ``ukd`` method: labels and weights per train row."""

    scores: np.ndarray  # MC-dropout mean P(click) of every train row: the unexposed rows' soft labels
    variance: np.ndarray  # MC-dropout variance of that probability, every train row
    weights: np.ndarray  # uncertainty weight per train row: unexposed rows mean 1, exposed rows 1
    valid_auc: float  # the kept checkpoint's AUC on the validation exposed clicks
    discriminator_auc: float  # a fresh linear probe's held-out AUC of exposed vs unexposed on the representation
    adversary_auc: float  # the jointly trained discriminator's AUC on the same held-out rows
    best_step: int
    steps_run: int
    temperature: float
    seconds: float
    settings: dict


def _standardization(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of signed-log1p ``x`` per column, in chunks (no float64 copy of the whole matrix)."""
    total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        z = np.asarray(x[start : start + chunk], dtype=np.float64)
        z = np.sign(z) * np.log1p(np.abs(z))
        total += z.sum(axis=0)
        total_sq += (z**2).sum(axis=0)
    mean = total / len(x)
    std = np.sqrt(np.maximum(total_sq / len(x) - mean**2, 0.0))
    # a constant column: std 1, so it enters as 0 instead of exploding on another value
    return mean, np.where(std < 1e-6, 1.0, std)


_CHUNK = 8192


def _predict(net: _UkdNet, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(net(x[s : s + _CHUNK])).numpy() for s in range(0, len(x), _CHUNK)])


def fit_ukd_teacher(
    train_x: np.ndarray,
    exposed: np.ndarray,
    clicked: np.ndarray,
    valid_x: np.ndarray,
    valid_clicked: np.ndarray,
    seed: int,
    *,
    hidden: int = 64,
    dropout: float = 0.2,
    adv_weight: float = 1.0,
    ramp_steps: int = 200,
    discriminator_steps: int = 2,
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    eval_every: int = 50,
    patience: int = 6,
    mc_passes: int = 20,
    temperature: float | None = None,
    probe_rows: int = 10000,
    threads: int | None = 1,
) -> UkdTeacher:
    """The UKD teacher of the ``ukd`` method (module docstring).

    ``train_x``: every training candidate's features; ``exposed`` its mask; ``clicked`` the clicks (read on
    exposed rows only; NaN elsewhere is fine). ``valid_x``/``valid_clicked``: the validation days' exposed
    rows and their clicks, for early stopping. Any feature matrix works: :func:`ranker_features`' (with
    ``encoder.transform`` for the validation rows) gives this teacher the ranker teacher's inputs.

    Each step draws a batch of exposed rows for the click loss and a balanced batch (half exposed, half
    unexposed) for the discriminator, which first takes ``discriminator_steps`` updates of its own on it;
    its reversed gradient then reaches the encoder with a strength ramped from 0 to ``adv_weight`` over
    ``ramp_steps``. Checkpoints count from the end of the ramp on (the kept teacher trained under the full
    reversal); the one with the best validation AUC is kept. Deterministic given ``seed``; torch's global
    random state and thread count are restored afterwards. ``threads=1``: a 64-unit MLP gains little from
    intra-op threads and loses much when the cores are shared."""
    settings = UkdSettings(
        hidden=hidden,
        dropout=dropout,
        adv_weight=adv_weight,
        ramp_steps=ramp_steps,
        discriminator_steps=discriminator_steps,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        eval_every=eval_every,
        patience=patience,
        mc_passes=mc_passes,
        temperature=temperature,
        probe_rows=probe_rows,
        threads=threads,
    )
    if ramp_steps >= steps:
        raise ValueError(f"ramp_steps ({ramp_steps}) must be below steps ({steps}): no checkpoint would count")
    exposed = np.asarray(exposed, bool)
    if exposed.all() or not exposed.any():
        raise ValueError("the UKD teacher needs exposed and unexposed rows")
    labels = np.asarray(clicked, float)[exposed]
    if np.isnan(labels).any():
        raise ValueError("every exposed row needs a click (0/1)")
    started = time.perf_counter()
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = _fit_ukd(train_x, exposed, labels, valid_x, np.asarray(valid_clicked, int), seed, settings)
    result.seconds = time.perf_counter() - started
    log.info(
        "UKD teacher: step %d/%d, valid AUC %.4f, exposure probe AUC %.4f (adv_weight %.2f, %.1fs)",
        result.best_step,
        result.steps_run,
        result.valid_auc,
        result.discriminator_auc,
        adv_weight,
        result.seconds,
    )
    return result


def _fit_ukd(train_x, exposed, labels, valid_x, valid_clicked, seed: int, s: UkdSettings) -> UkdTeacher:
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    vx = torch.from_numpy(np.ascontiguousarray(valid_x, dtype=np.float32))
    mean, std = _standardization(train_x)
    net = _UkdNet(mean, std, s.hidden, s.dropout)
    adversary = net.discriminator.parameters()
    learner = [p for name, p in net.named_parameters() if not name.startswith("discriminator.")]
    optimizer = torch.optim.Adam(learner, lr=s.lr, weight_decay=s.weight_decay)
    adversary_optimizer = torch.optim.Adam(adversary, lr=s.lr)
    generator = torch.Generator().manual_seed(seed)
    idx_exposed = torch.from_numpy(np.flatnonzero(exposed))
    idx_unexposed = torch.from_numpy(np.flatnonzero(~exposed))
    y = torch.zeros(len(train_x))
    y[idx_exposed] = torch.from_numpy(labels.astype(np.float32))
    half = max(s.batch_size // 2, 1)
    domain = torch.cat([torch.ones(half), torch.zeros(half)])

    def draw(pool: torch.Tensor, n: int) -> torch.Tensor:
        return pool[torch.randint(len(pool), (n,), generator=generator)]

    best_auc, best_state, best_step, stale, step = -np.inf, None, 0, 0, 0
    for step in range(1, s.steps + 1):
        net.train()
        rows = draw(idx_exposed, s.batch_size)
        click_loss = F.binary_cross_entropy_with_logits(net(x[rows]), y[rows])
        # the reversal grows from 0 so the encoder first learns what predicts a click
        strength = s.adv_weight * (2.0 / (1.0 + np.exp(-10.0 * min(step / s.ramp_steps, 1.0))) - 1.0)
        both = torch.cat([draw(idx_exposed, half), draw(idx_unexposed, half)])
        representation = net.represent(x[both])
        # the adversary first catches up on this batch alone: reversing the gradient of a stale adversary
        # only teaches the encoder to fool that one, not to drop what tells exposure apart
        for _ in range(s.discriminator_steps):
            adversary_optimizer.zero_grad()
            logit = net.discriminator(representation.detach()).squeeze(-1)
            F.binary_cross_entropy_with_logits(logit, domain).backward()
            adversary_optimizer.step()
        logit = net.discriminator(_ReverseGradient.apply(representation, float(strength))).squeeze(-1)
        domain_loss = F.binary_cross_entropy_with_logits(logit, domain)
        optimizer.zero_grad()
        adversary_optimizer.zero_grad()
        (click_loss + domain_loss).backward()
        optimizer.step()
        adversary_optimizer.step()
        if step < s.ramp_steps or (step % s.eval_every and step != s.steps):
            continue
        net.eval()
        auc = auc_or_nan(valid_clicked, _predict(net, vx)) if len(vx) else float("nan")
        if best_state is None or np.isnan(auc) or auc > best_auc:
            best_auc, best_state, best_step, stale = auc, copy.deepcopy(net.state_dict()), step, 0
        else:
            stale += 1
            if stale >= s.patience:
                break
    net.load_state_dict(best_state)

    # MC dropout: dropout stays on, so each pass is a draw from the teacher's uncertainty; the first
    # layer is deterministic and computed once
    with torch.no_grad():
        net.eval()
        first = torch.cat([net.first_layer(x[r : r + _CHUNK]) for r in range(0, len(x), _CHUNK)])
        net.train()
        passes = np.stack(
            [
                np.concatenate(
                    [
                        torch.sigmoid(net.click_from_first(first[r : r + _CHUNK])).numpy()
                        for r in range(0, len(x), _CHUNK)
                    ]
                )
                for _ in range(s.mc_passes)
            ]
        )
    scores, variance = passes.mean(axis=0), passes.var(axis=0)
    # the variance is heavy-tailed: scaled by a high quantile, most rows keep a weight above e^-1 and only
    # the most uncertain tail decays towards 0 (the mean would zero out every row far above it)
    temperature = s.temperature or float(max(np.quantile(variance[~exposed], TEMPERATURE_QUANTILE), 1e-12))
    raw = np.exp(-variance / temperature)
    weights = np.ones(len(train_x))
    weights[~exposed] = raw[~exposed] / raw[~exposed].mean()

    net.eval()
    probe_auc, adversary_auc = _exposure_probe(net, x, idx_exposed, idx_unexposed, s.probe_rows, seed)
    return UkdTeacher(
        scores=scores,
        variance=variance,
        weights=weights,
        valid_auc=float(best_auc),
        discriminator_auc=probe_auc,
        adversary_auc=adversary_auc,
        best_step=best_step,
        steps_run=step,
        temperature=temperature,
        seconds=0.0,
        settings=asdict(s),
    )


def _exposure_probe(
    net: _UkdNet, x: torch.Tensor, idx_exposed: torch.Tensor, idx_unexposed: torch.Tensor, n_rows: int, seed: int
) -> tuple[float, float]:
    """How well exposure can still be read from the representation: a fresh logistic regression fitted on
    half of a balanced sample of rows, its AUC on the other half (0.5: invariant); and the adversary's own
    AUC on that half. A fresh probe, because an adversary trained against a moving encoder can be fooled
    while the information is still there."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng([seed, 811])
    per_side = min(len(idx_exposed), len(idx_unexposed), max(n_rows // 2, 2))
    rows = np.concatenate(
        [
            rng.choice(idx_exposed.numpy(), per_side, replace=False),
            rng.choice(idx_unexposed.numpy(), per_side, replace=False),
        ]
    )
    domain = np.r_[np.ones(per_side), np.zeros(per_side)].astype(int)
    order = rng.permutation(len(rows))
    rows, domain = rows[order], domain[order]
    with torch.no_grad():
        rep = torch.cat([net.represent(x[torch.from_numpy(rows[r : r + _CHUNK])]) for r in range(0, len(rows), _CHUNK)])
        adversary = net.discriminator(rep).squeeze(-1).numpy()
    rep = rep.numpy().astype(np.float64)
    fit, held = slice(0, len(rows) // 2), slice(len(rows) // 2, None)
    mu, sd = rep[fit].mean(axis=0), rep[fit].std(axis=0) + 1e-6
    with threadpool_limits(limits=1):  # a small fit: BLAS threads only spin when the cores are shared
        probe = LogisticRegression(max_iter=1000).fit((rep[fit] - mu) / sd, domain[fit])
    probe_auc = auc_or_nan(domain[held], probe.decision_function((rep[held] - mu) / sd))
    return probe_auc, auc_or_nan(domain[held], adversary[held])
