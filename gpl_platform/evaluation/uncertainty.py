"""Paired bootstrap intervals of metric differences between methods, over simulator worlds, training seeds and
test requests (docs/EVALUATION.md: "GPL helps" only where the interval excludes 0).

**Input layout.** ``per_request`` maps ``(world, seed)`` to one frame per training run of every method:

- indexed by request id: the world's test requests (every seed of a world has the same requests, as they
  share the world's test days);
- columns ``"<method>:<column>"`` for every method, ``<column>`` being those of
  :func:`gpl_platform.evaluation.metrics.request_metrics` (``n``, ``pos``, ``auc``, ``hits@10``, ``hr@10``,
  ``pooled_pairs``), computed on the candidates the metric is about (the unexposed test candidates for the
  ``unexposed_*`` metrics) with that world's oracle labels and that seed's scores.

:func:`paired_frame` builds one from ``{method: request_metrics(...)}`` and checks the pairing (same requests,
same candidates and labels for every method). A metric is read from its name: ``...gauc`` (per-request AUC
weighted by the request's candidates, requests with both classes), ``...hr@K`` (mean over requests with a
positive), any other ``...auc`` (pooled AUC over all candidates).

**Resampling.** One replicate draws the worlds with replacement; for each drawn world, its seeds with
replacement and its test requests with replacement (one request draw per drawn world, shared by its seeds
and by both methods: the comparison stays paired). A drawn request counts as many times as it is drawn, so
a run's GAUC or HR@K on the draw is a weighted mean of the per-request columns (weights: candidates of
requests with both classes; requests with a positive) and no AUC is computed again. The replicate of a
difference is the point difference (mean over worlds of the mean over seeds) plus, averaged over the drawn
worlds: the world's deviation from the mean, its drawn seeds' deviations from the world's mean, and the
change of its seeds' mean difference on the drawn requests. The interval is the 2.5 / 97.5 percentiles.

Two corrections make 95% mean 95%, both checked by simulation (tests/evaluation/test_uncertainty.py):

- each level's deviations are shrunk by the variance the levels below already put in them (method of
  moments: a seed's value carries request noise, a world's value its seeds' and requests'), so no noise is
  counted twice. Resampling every level as is covered a pure request-noise difference 99.5% of the time, with
  intervals 1.75x as wide as its true error needs (median), against 0.96 and 1.17x with the shrinking;
- the world part is widened by t(0.975, worlds - 1) / z(0.975) (x2.2 for 3 worlds, x1.12 for 12): the
  between-world variance is estimated with worlds - 1 degrees of freedom. Without it, 3 worlds that disagree
  were covered 78% of the time (10 worlds: 89%); with it, 90% (93%).

Measured coverage of a zero difference (200 simulations of 3 worlds x 3 seeds x 60 requests): 0.96 with
request noise, 0.95 with request and seed noise, 0.90 with worlds that disagree (0.93 with 10 worlds).
Conservative where a variance component is zero (its estimate is >= 0); more worlds are the only cure for
worlds that disagree.

**Pooled AUC** is not a sum over requests (a pair may join two requests), so a replicate uses its first-order
expansion in the request multiplicities ``m``: ``AUC(m) ~ AUC + sum_r m_r c_r`` with
``c_r = pooled_pairs_r / (P N) - AUC (pos_r / P + neg_r / N)`` (they sum to 0). The exact value is a quadratic
form in ``m``; the dropped term is O(1/R) against the O(1/sqrt(R)) spread it is used for
(tests/evaluation/test_uncertainty.py compares it with exact recomputation).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: request draws are made this many replicate-slots at a time (memory: chunk x requests counts)
_CHUNK = 256


def paired_frame(by_method: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One (world, seed)'s per-request frame from each method's ``request_metrics`` frame, columns
    ``"<method>:<column>"``. Refuses frames that are not paired: other requests, or other candidate or
    positive counts (another mask or other labels)."""
    if not by_method:
        raise ValueError("no method")
    methods = list(by_method)
    first = by_method[methods[0]]
    parts = []
    for method in methods:
        frame = by_method[method]
        if ":" in method:
            raise ValueError(f"method name {method!r} contains ':'")
        if not frame.index.equals(first.index):
            if set(frame.index) != set(first.index):
                raise ValueError(f"{method} was scored on other requests than {methods[0]}")
            frame = frame.reindex(first.index)
        for column in ("n", "pos"):
            if not np.array_equal(frame[column].to_numpy(), first[column].to_numpy()):
                raise ValueError(f"{method} and {methods[0]} differ in {column!r}: not the same candidates or labels")
        parts.append(frame.add_prefix(f"{method}:"))
    return pd.concat(parts, axis=1)


def _kind(metric: str) -> tuple[str, str]:
    """(kind, value column) of a metric name."""
    hr = re.search(r"hr@(\d+)$", metric)
    if hr:
        return "ratio", f"hr@{hr.group(1)}"
    if metric.endswith("gauc"):
        return "ratio", "auc"
    if metric.endswith("auc"):
        return "pooled", "pooled_pairs"
    raise ValueError(f"metric {metric!r}: the name must end in gauc, auc or hr@K")


def _run_arrays(frame: pd.DataFrame, method: str, metric: str) -> tuple[str, np.ndarray, np.ndarray, float]:
    """For one run: (kind, per-request numerator or contribution, per-request weight, point value)."""
    kind, column = _kind(metric)
    try:
        value = frame[f"{method}:{column}"].to_numpy(float)
        n = frame[f"{method}:n"].to_numpy(float)
        pos = frame[f"{method}:pos"].to_numpy(float)
    except KeyError as err:
        raise KeyError(f"the per-request frame has no {err.args[0]!r} (method {method!r}, metric {metric!r})") from None
    if kind == "ratio":
        defined = ~np.isnan(value)
        # GAUC weighs a request by its candidates, HR@K counts each request with a positive once
        weight = np.where(defined, n if column == "auc" else 1.0, 0.0)
        numerator = np.where(defined, value, 0.0) * weight
        total = weight.sum()
        return kind, numerator, weight, float(numerator.sum() / total) if total else float("nan")
    big_p, big_n = pos.sum(), (n - pos).sum()
    if not big_p or not big_n:
        return kind, np.zeros_like(n), np.zeros_like(n), float("nan")
    point = value.sum() / 2 / (big_p * big_n)
    contribution = value / (big_p * big_n) - point * (pos / big_p + (n - pos) / big_n)
    return kind, contribution, np.zeros_like(n), float(point)


@dataclass
class _World:
    key: Hashable
    seeds: list
    frames: list[pd.DataFrame]

    @property
    def n_requests(self) -> int:
        return len(self.frames[0])


def _worlds(per_request: dict[tuple[Hashable, Hashable], pd.DataFrame]) -> list[_World]:
    if not per_request:
        raise ValueError("no per-request frame")
    worlds: dict[Hashable, _World] = {}
    for (world, seed), frame in per_request.items():
        entry = worlds.setdefault(world, _World(world, [], []))
        if entry.frames and not frame.index.equals(entry.frames[0].index):
            if set(frame.index) != set(entry.frames[0].index):
                raise ValueError(f"world {world!r}: seed {seed!r} has other test requests than seed {entry.seeds[0]!r}")
            frame = frame.reindex(entry.frames[0].index)
        _check_paired(frame, f"world {world!r} seed {seed!r}")
        entry.seeds.append(seed)
        entry.frames.append(frame)
    return list(worlds.values())


def _check_paired(frame: pd.DataFrame, where: str) -> None:
    """Every method of a frame must have been scored on the same candidates with the same labels."""
    for column in ("n", "pos"):
        own = [c for c in frame.columns if str(c).endswith(f":{column}")]
        values = frame[own].to_numpy()
        if len(own) > 1 and not (values == values[:, :1]).all():
            raise ValueError(f"{where}: the methods differ in {column!r}: not the same candidates or labels")


@dataclass
class _Draws:
    """One world's bootstrap draws and, per (method, metric), each run's value on them."""

    replicate: np.ndarray  # (K,) the replicate each of the world's K slots belongs to
    seed_weight: np.ndarray  # (K, S) drawn seed counts / S
    stats: dict[tuple[str, str], np.ndarray]  # (K, S): each seed's run on the slot's resampled requests
    points: dict[tuple[str, str], np.ndarray]  # (S,): each seed's run on all requests


def _draw(worlds: list[_World], specs: Sequence[tuple[str, str]], n_boot: int, seed: int) -> list[_Draws]:
    """Worlds drawn with replacement (``n_boot`` x n_worlds slots); per slot, the world's seeds and its requests
    drawn with replacement, and every spec's run values on those requests. The draws depend only on the worlds,
    seeds and requests (not on ``specs``): every comparison of one call sees the same resamples."""
    specs = list(dict.fromkeys(specs))
    rng = np.random.default_rng(seed)
    n_worlds = len(worlds)
    drawn = rng.integers(0, n_worlds, size=(n_boot, n_worlds)).ravel()  # slot b * n_worlds + j: a drawn world
    out = []
    for w, world in enumerate(worlds):
        n_req, n_seeds = world.n_requests, len(world.seeds)
        # per spec and seed, numerator and weight columns side by side: one product per chunk serves all
        blocks, layout, points = [], {}, {}
        for spec in specs:
            runs = [_run_arrays(frame, *spec) for frame in world.frames]
            layout[spec] = (runs[0][0], sum(b.shape[1] for b in blocks))
            points[spec] = np.array([r[3] for r in runs])
            blocks.append(np.column_stack([r[1] for r in runs] + [r[2] for r in runs]))
        columns = np.hstack(blocks)
        slots = np.flatnonzero(drawn == w)
        seed_draws = rng.integers(0, n_seeds, size=(len(slots), n_seeds)) + np.arange(len(slots))[:, None] * n_seeds
        seed_weight = np.bincount(seed_draws.ravel(), minlength=len(slots) * n_seeds).reshape(len(slots), n_seeds)
        on_draws = {spec: np.empty((len(slots), n_seeds)) for spec in specs}
        for begin in range(0, len(slots), _CHUNK):
            rows = slice(begin, min(begin + _CHUNK, len(slots)))
            k = rows.stop - rows.start
            draws = rng.integers(0, n_req, size=(k, n_req)) + np.arange(k)[:, None] * n_req
            counts = np.bincount(draws.ravel(), minlength=k * n_req).reshape(k, n_req).astype(float)
            sums = counts @ columns
            for spec, (kind, start) in layout.items():
                numerator = sums[:, start : start + n_seeds]
                if kind == "ratio":
                    with np.errstate(divide="ignore", invalid="ignore"):
                        on_draws[spec][rows] = numerator / sums[:, start + n_seeds : start + 2 * n_seeds]
                else:
                    on_draws[spec][rows] = points[spec] + numerator
        out.append(_Draws(slots // n_worlds, seed_weight / n_seeds, on_draws, points))
    return out


def _shrink(deviations: np.ndarray, excess: float) -> float:
    """Factor making the with-replacement resampling of ``deviations`` (from their mean) vary as much as
    their spread beyond ``excess``: the variance lower levels' resampling already reproduces (method of
    moments: E[sample variance] = own component + excess)."""
    if len(deviations) < 2:
        return 0.0
    mean_square = float(np.mean(deviations**2))
    own = max(0.0, float(np.var(deviations, ddof=1)) - excess)
    return float(np.sqrt(own / mean_square)) if mean_square > 0 else 0.0


def _difference(draws: list[_Draws], a: tuple[str, str], b: tuple[str, str], n_boot: int) -> tuple[float, np.ndarray]:
    """Point difference and its replicates (module docstring, "Resampling")."""
    values, within = [], []
    for world in draws:
        diff, point = world.stats[a] - world.stats[b], world.points[a] - world.points[b]
        n_seeds = len(point)
        value = float(point.mean())
        change = diff.mean(axis=1) - value  # requests: the seeds' mean on the drawn requests
        seed_part = 0.0
        if n_seeds > 1:
            # a seed's deviation from the others' holds request noise too: its spread under request resampling
            spread = np.nanvar(diff - diff.mean(axis=1, keepdims=True), axis=0).mean() * n_seeds / (n_seeds - 1)
            deviation = point - value
            seed_part = _shrink(deviation, float(spread)) * (world.seed_weight - 1 / n_seeds) @ deviation
        values.append(value)
        within.append(change + seed_part)
    values = np.array(values)
    mean = float(values.mean())
    world_excess = float(np.mean([np.nanvar(z) for z in within])) if within else 0.0
    factor = _shrink(values - mean, world_excess)
    if len(values) > 1:
        # the between-world variance has (worlds - 1) degrees of freedom: widen its part as a t-interval would
        # (3 worlds that disagree were otherwise covered ~78% of the time instead of 95%)
        factor *= stats.t.ppf(0.975, len(values) - 1) / stats.norm.ppf(0.975)
    total = np.zeros(n_boot)
    for world, value, z in zip(draws, values, within):
        np.add.at(total, world.replicate, factor * (value - mean) + z)
    return mean, mean + total / len(draws)


def _interval(draws: list[_Draws], n_boot: int, method: str, against: str, metric: str):
    diff, reps = _difference(draws, (method, metric), (against, metric), n_boot)
    finite = reps[np.isfinite(reps)]
    if not np.isfinite(diff) or len(finite) < n_boot / 2:
        return (diff if np.isfinite(diff) else None), [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return diff, [float(lo), float(hi)]


def _sizes(worlds: list[_World]) -> dict:
    return {
        "n_worlds": len(worlds),
        "n_seeds": min(len(w.seeds) for w in worlds),
        "n_requests": sum(w.n_requests for w in worlds),
    }


def paired_bootstrap(
    per_request: dict[tuple[Hashable, Hashable], pd.DataFrame],
    method: str,
    against: str,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """``metric`` of ``method`` minus ``against`` (the mean over worlds of the mean over seeds) and its 95%
    percentile interval from the hierarchical paired bootstrap of the module docstring:
    ``{"diff", "ci95": [lo, hi], "n_worlds", "n_seeds" (per world, the fewest), "n_requests" (over worlds),
    "n_boot"}``. ``ci95`` is ``[None, None]`` when the metric is undefined in most replicates."""
    worlds = _worlds(per_request)
    draws = _draw(worlds, [(method, metric), (against, metric)], n_boot, seed)
    diff, ci = _interval(draws, n_boot, method, against, metric)
    return {"diff": diff, "ci95": ci, **_sizes(worlds), "n_boot": n_boot}


def methods_of(per_request: dict[tuple[Hashable, Hashable], pd.DataFrame]) -> list[str]:
    """The methods whose columns every per-request frame carries, in the first frame's column order (a method
    skipped in one world or seed, e.g. GPL without pseudo-labels there, cannot be compared paired)."""
    present = [list(dict.fromkeys(str(c).split(":", 1)[0] for c in frame.columns)) for frame in per_request.values()]
    return [m for m in present[0] if all(m in other for other in present[1:])]


def comparisons(
    per_request: dict[tuple[Hashable, Hashable], pd.DataFrame],
    method: str = "gpl",
    against: Sequence[str] | None = None,
    metrics: Sequence[str] = ("unexposed_gauc", "unexposed_auc"),
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """``method`` against each of ``against`` (default: every other method of the frames) on each metric, one
    bootstrap for all (the same resamples for every entry, so each equals :func:`paired_bootstrap` with the
    same ``n_boot`` and ``seed``): ``[{"method", "against", "metric", "diff", "ci95": [lo, hi], "n_worlds",
    "n_seeds", "n_requests"}, ...]``, the shape of the sweep JSON's ``comparisons``."""
    present = methods_of(per_request)
    against = [m for m in present if m != method] if against is None else list(against)
    missing = sorted({method, *against} - set(present))
    if missing:
        raise ValueError(f"no per-request columns for {missing} (have {present})")
    worlds = _worlds(per_request)
    specs = [(m, metric) for metric in metrics for m in (method, *against)]
    draws = _draw(worlds, specs, n_boot, seed)
    out = []
    for metric in metrics:
        for other in against:
            diff, ci = _interval(draws, n_boot, method, other, metric)
            out.append(
                {"method": method, "against": other, "metric": metric, "diff": diff, "ci95": ci, **_sizes(worlds)}
            )
    return out


def helps(
    comparisons: Sequence[dict],
    best_baseline: str | None,
    best_control: str | None,
    metric: str = "unexposed_gauc",
    method: str = "gpl",
) -> bool:
    """The claim rule: ``method`` helps only where the 95% intervals of its difference to the best tuned
    baseline *and* to the best control both lie above 0. Without either comparison there is no claim."""

    def above_zero(against: str | None) -> bool:
        for entry in comparisons:
            if (entry["method"], entry["against"], entry["metric"]) == (method, against, metric):
                lo = entry.get("ci95", [None, None])[0]
                return lo is not None and lo > 0
        return False

    return (
        best_baseline is not None
        and best_control is not None
        and above_zero(best_baseline)
        and above_zero(best_control)
    )
