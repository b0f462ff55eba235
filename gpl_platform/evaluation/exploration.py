"""The exploration slice as the test set of real logs (docs/EVALUATION.md, "Real logs: the exploration slice").

On the requests an exploration policy served, what was shown does not depend on what the production system
believed, so the clicks of the shown candidates say how a model orders *all* of a request's candidates:

- ``gauc``: per request, the AUC of the model's scores among its shown candidates (clicked against not),
  averaged over requests with both classes, each weighted by its estimated candidate count;
- ``auc``: the same pairs pooled over every request of the slice;
- ``hr@10``: the share of the slice's shown clicks that the model ranks in the top 10 of *all* their
  request's candidates (shown or not): an estimate of the share of all positives of the slice's requests
  that reach their request's top 10 (recall@10, pooled over requests).

Every shown row is weighted by 1/propensity (clipped at ``training.ips_clip``). Under a uniform policy the
weights of one request are equal (n/k), so the per-request numbers are the plain ones and the weights only
make a request count by its candidate count, as the oracle's GAUC does. Under a non-uniform exploration
policy they are inverse-propensity estimates. Intervals: a bootstrap over the slice's requests (one draw
shared by every method and seed, so comparisons are paired) and over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpl_platform.data.policies import LoggingPolicies, exploration_mask
from gpl_platform.evaluation.metrics import from_request_metrics, request_metrics
from gpl_platform.evaluation.uncertainty import comparisons, helps, methods_of, paired_frame

SLICE_METRICS = ("gauc", "auc", "hr@10")
K = 10


def right_ordered_mass(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """For each row: the weight of the other class's rows of its group that it is ordered right against
    (a positive: negatives scored below it; a negative: positives scored above it), ties counting half."""
    frame = pd.DataFrame(
        {"g": groups, "s": np.asarray(scores, float), "pos": weights * labels, "neg": weights * (1 - labels)}
    )
    blocks = frame.groupby(["g", "s"], sort=True)[["pos", "neg"]].sum()
    inclusive = blocks.groupby(level=0).cumsum()
    total_pos = blocks["pos"].groupby(level=0).transform("sum")
    blocks["neg_below"] = inclusive["neg"] - blocks["neg"] + 0.5 * blocks["neg"]
    blocks["pos_above"] = total_pos - inclusive["pos"] + 0.5 * blocks["pos"]
    joined = frame.join(blocks[["neg_below", "pos_above"]], on=["g", "s"])
    return np.where(labels == 1, joined["neg_below"].to_numpy(), joined["pos_above"].to_numpy())


def slice_request_metrics(slice_rows: pd.DataFrame, scores: np.ndarray, clip: float, k: int = K) -> pd.DataFrame:
    """Per request of the slice, the columns of :func:`~gpl_platform.evaluation.metrics.request_metrics`
    (``n``, ``pos``, ``auc``, ``hr@K``, ``pooled_pairs``), weighted by 1/propensity: ``n`` and ``pos`` are the
    weights of the shown rows and shown clicks. ``slice_rows``: every candidate of the slice's requests
    (``request_id``, ``exposed``, ``clicked``, ``propensity``); ``scores``: the model's, one per row."""
    frame = slice_rows[["request_id", "exposed", "clicked", "propensity"]].reset_index(drop=True)
    frame["score"] = np.asarray(scores, float)
    frame["row"] = np.arange(len(frame))
    order = frame.sort_values(["request_id", "score", "row"], ascending=[True, False, True], kind="stable")
    frame.loc[order.index, "top"] = (order.groupby("request_id", sort=False).cumcount() < k).to_numpy()
    shown = frame[frame["exposed"].astype(bool)].reset_index(drop=True)
    y = shown["clicked"].to_numpy(float)
    w = np.minimum(1.0 / np.maximum(shown["propensity"].to_numpy(float), 1e-9), clip)
    codes, requests = pd.factorize(shown["request_id"], sort=True)
    n_req = len(requests)
    n = np.bincount(codes, weights=w, minlength=n_req)
    pos = np.bincount(codes, weights=w * y, minlength=n_req)
    hits = np.bincount(codes, weights=w * y * shown["top"].to_numpy(float), minlength=n_req)
    within = right_ordered_mass(codes, shown["score"].to_numpy(), y, w)
    right = np.bincount(codes, weights=w * y * within, minlength=n_req)
    neg = n - pos
    pooled = right_ordered_mass(np.zeros(len(shown), int), shown["score"].to_numpy(), y, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        request_auc = np.where((pos > 0) & (neg > 0), right / (pos * neg), np.nan)
        hit_rate = np.where(pos > 0, hits / pos, np.nan)
    return pd.DataFrame(
        {
            "n": n,
            "pos": pos,
            "auc": request_auc,
            f"hits@{k}": hits,
            f"hr@{k}": hit_rate,
            "pooled_pairs": np.bincount(codes, weights=w * pooled, minlength=n_req),
        },
        index=pd.Index(requests, name="request_id"),
    )


def slice_metric(frame: pd.DataFrame, metric: str) -> float:
    """``gauc`` or ``auc`` as :func:`~gpl_platform.evaluation.metrics.from_request_metrics` reads them from
    the per-request columns; ``hr@K`` pooled: the weighted shown clicks in the top K over all shown clicks."""
    if metric.startswith("hr@"):
        pos = frame["pos"].sum()
        return float(frame[f"hits@{metric[3:]}"].sum() / pos) if pos > 0 else float("nan")
    return from_request_metrics(frame, metric)


def _interval(frames: list[pd.DataFrame], metric: str, n_boot: int, seed: int) -> list[float | None]:
    """95% percentile interval of the seeds' mean ``metric`` over requests and seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    n_requests = len(frames[0])
    values = []
    for _ in range(n_boot):
        rows = rng.integers(0, n_requests, n_requests)
        drawn = rng.integers(0, len(frames), len(frames))
        values.append(np.nanmean([slice_metric(frames[s].iloc[rows], metric) for s in drawn]))
    values = np.asarray(values, float)
    if np.isnan(values).mean() > 0.5:
        return [None, None]
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def slice_section(
    per_seed: dict[int, dict[str, pd.DataFrame]],
    families: dict[str, str],
    min_requests: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The report's ``exploration`` section from ``{seed: {method: slice_request_metrics(...)}}``: per method
    and metric its mean and std over seeds and a 95% interval; gpl against every other method (paired); the
    claim rule's answer on the slice; a warning when the slice has fewer than ``min_requests`` requests."""
    seeds = sorted(per_seed)
    methods = list(next(iter(per_seed.values())))
    n_requests = len(next(iter(next(iter(per_seed.values())).values())))
    out: dict = {"requests": n_requests, "methods": {}}
    for method in methods:
        frames = [per_seed[s][method] for s in seeds]
        out["methods"][method] = {
            metric: {
                "mean": float(np.nanmean(points := [slice_metric(f, metric) for f in frames])),
                "std": float(np.nanstd(points)),
                "ci95": _interval(frames, metric, n_boot, seed),
            }
            for metric in SLICE_METRICS
        }
    per_request = {(0, s): paired_frame(per_seed[s]) for s in seeds}
    if "gpl" in methods_of(per_request) and len(methods) > 1:
        # paired intervals of the differences (the hierarchical bootstrap of the sweep, one world): GAUC and AUC
        out["comparisons"] = comparisons(per_request, "gpl", metrics=("gauc", "auc"), n_boot=n_boot, seed=seed)
        out["gpl_helps"] = _gpl_helps(out, families)
    if n_requests < min_requests:
        out["warning"] = (
            f"only {n_requests} exploration requests (evaluation.min_exploration_requests={min_requests}): "
            "the intervals are too wide to rank methods by"
        )
    return out


def _gpl_helps(section: dict, families: dict[str, str]) -> dict:
    """The claim rule of docs/EVALUATION.md on the slice's GAUC: gpl against the best baseline and the
    best control."""

    def best(family: str) -> str | None:
        ranked = [
            (v["gauc"]["mean"], m)
            for m, v in section["methods"].items()
            if families.get(m) == family and np.isfinite(v["gauc"]["mean"])
        ]
        return max(ranked)[1] if ranked else None

    baseline, control = best("baseline"), best("control")
    return {
        "best_baseline": baseline,
        "best_control": control,
        "helps": helps(section["comparisons"], baseline, control, metric="gauc"),
        "metric": "gauc",
    }


def interval_cell(entry: dict) -> str:
    """``mean [lo, hi]`` of a metric entry for a table (the mean alone where there is no interval)."""
    lo, hi = entry.get("ci95") or [None, None]
    interval = f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else ""
    return f"{entry['mean']:.4f}{interval}"


def oracle_metric(per_request: pd.DataFrame, metric: str) -> float:
    """The oracle's counterpart of :func:`slice_metric` over every candidate of the slice's requests
    (``per_request`` from :func:`~gpl_platform.evaluation.metrics.request_metrics` with the oracle labels):
    hr@K as pooled recall@K, the others as the metrics module reads them."""
    if metric.startswith("hr@"):
        pos = per_request["pos"].sum()
        return float(per_request[f"hits@{metric[3:]}"].sum() / pos) if pos > 0 else float("nan")
    return from_request_metrics(per_request, metric)


def slice_against_oracle(
    test: pd.DataFrame,
    truth: np.ndarray,
    scores: dict[tuple[str, int], np.ndarray],
    evaluation,
    families: dict[str, str],
    clip: float,
) -> dict | None:
    """On a benchmark source whose log has an exploration slice: the slice's estimates (as a real log would
    report them, from the shown rows' clicks) next to the truth over every candidate of the same requests
    (``truth``: the oracle label of every ``test`` row), so the two can be compared. None without a slice."""
    mask = exploration_mask(test, LoggingPolicies.from_settings(evaluation))
    if evaluation.exploration_trains or not mask.any():
        return None
    rows = test[mask].reset_index(drop=True)
    per_seed: dict[int, dict[str, pd.DataFrame]] = {}
    oracle: dict[str, dict[str, list[float]]] = {}
    for (method, seed), values in scores.items():
        per_seed.setdefault(seed, {})[method] = slice_request_metrics(rows, values[mask], clip)
        full = request_metrics(rows["request_id"].to_numpy(), truth[mask], values[mask])
        for metric in SLICE_METRICS:
            oracle.setdefault(method, {}).setdefault(metric, []).append(oracle_metric(full, metric))
    section = slice_section(per_seed, families, evaluation.min_exploration_requests)
    section["oracle"] = {m: {k: float(np.nanmean(v)) for k, v in by.items()} for m, by in oracle.items()}
    return section
