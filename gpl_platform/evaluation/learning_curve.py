"""The learning curve (issue 32; docs/EVALUATION.md, "Learning curve"): label quality and GPL's content share as
the simulator's world grows, beside the generator's cost.

``bench/bench_learning_curve.py`` (``gpl bench learning-curve``) runs each size's world through the bias sweep's
machinery; this module holds what is read from a size: the pseudo-labels' quality on its validation days (the
candidates and numbers of the ceiling's ``valid`` window, :mod:`gpl_platform.evaluation.ceiling`, with intervals
over worlds and requests), the content share from the sweep's comparisons, the computed reading and the plot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from gpl_platform.config import EvaluationConfig, TrainingConfig
from gpl_platform.data.policies import held_out_of_training
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.bias_sweep import HEADLINE_METRIC, find_comparison
from gpl_platform.evaluation.ceiling import ceiling_row, load_oracle
from gpl_platform.evaluation.metrics import gauc, request_metrics
from gpl_platform.evaluation.report import save_figure
from gpl_platform.evaluation.uncertainty import paired_bootstrap, paired_frame
from gpl_platform.prerank import methods as registry
from gpl_platform.prerank.data import load_candidates, load_pseudo_labels, time_split
from gpl_platform.quality.gate import failing_label_days

_SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)")
#: a world needs training, validation and test days (prerank.data.time_split)
MIN_DAYS = 3
#: the scores whose per-request statistics are kept for the intervals: the labels, the true click probability
#: (the Bayes ceiling) and a constant (chance: AUC 0.5 on every resample, so level = 0.5 + difference to it)
CHANCE = "chance"


def parse_size(text: str) -> tuple[int, int]:
    """``"USERSxDAYS"`` (e.g. ``500x14``) as ``(users, days)``; anything else is refused with the reason."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"size {text!r}: expected USERSxDAYS, two positive integers joined by 'x' (e.g. 500x14)")
    users, days = int(match.group(1)), int(match.group(2))
    if days < MIN_DAYS:
        raise ValueError(f"size {text!r}: at least {MIN_DAYS} days (training, validation and test days)")
    return users, days


def parse_sizes(texts) -> list[tuple[int, int]]:
    """Every size of ``texts``, each once: a repeated size is refused (it would overwrite its own world)."""
    sizes = [parse_size(t) for t in texts]
    if not sizes:
        raise ValueError("no size: give at least one USERSxDAYS")
    repeated = sorted({size_name(*s) for s in sizes if sizes.count(s) > 1})
    if repeated:
        raise ValueError(f"size given more than once: {', '.join(repeated)}")
    return sizes


def size_name(users: int, days: int) -> str:
    return f"{users}x{days}"


def curve_methods() -> list[str]:
    """exposed_only, gpl and the content controls of the registry (gpl's rows and weights, other labels)."""
    return ["exposed_only", "gpl", *registry.names("control")]


def validation_label_quality(
    warehouse: Warehouse, training: TrainingConfig, evaluation: EvaluationConfig, label_gate
) -> tuple[dict, pd.DataFrame]:
    """The main pseudo-labels against the oracle on the validation days of the evaluation's time split: the
    unexposed candidates the training policies served that carry a pseudo-label on a day the blocking gate
    passes, the ``valid`` window of the ceiling (its ``all`` row, by :func:`ceiling.ceiling_row`), plus GAUC per
    request. Returns the numbers and the per-request statistics of labels, Bayes and chance (for intervals)."""
    split = time_split(warehouse, training.test_share, training.valid_share)
    days = split.valid_days
    cands = load_candidates(warehouse, days)
    trains = ~cands["logging_policy"].isin(set(held_out_of_training(evaluation))).to_numpy()
    unexposed = cands[trains & ~cands["exposed"].to_numpy(bool)][["day", "request_id", "user_id", "item_id"]]
    frame = unexposed.merge(load_oracle(warehouse, days, probability=True), on=["request_id", "item_id"], how="left")
    refused = failing_label_days(warehouse, days, label_gate)
    labels = load_pseudo_labels(warehouse, [d for d in days if d not in refused])
    joined = frame.merge(
        labels[["request_id", "item_id", "pseudo_label", "pseudo_label_mean_pool"]], on=["request_id", "item_id"]
    )
    row = ceiling_row(joined, {})
    y, requests = joined["oracle_label"].to_numpy(int), joined["request_id"].to_numpy()
    quality = {
        "days": [str(d) for d in days],
        "refused_days": sorted(str(d) for d in refused),
        "candidates": int(trains.sum()),
        "unexposed": int(len(frame)),
        "labelled_unexposed": int(len(joined)),
        "coverage": len(joined) / len(frame) if len(frame) else float("nan"),
        "positive_rate": row["positive_rate"],
        "pseudo_label_auc": row["pseudo_label_auc_max"],
        "pseudo_label_auc_mean_pool": row["pseudo_label_auc_mean"],
        "pseudo_label_gauc": gauc(requests, y, joined["pseudo_label"].to_numpy(float)) if len(joined) else math.nan,
        "bayes_auc": row["bayes_auc"],
    }
    scores = {"labels": joined["pseudo_label"].to_numpy(float), CHANCE: np.zeros(len(joined))}
    probability = joined["oracle_probability"].to_numpy(float)
    if len(joined) and not np.isnan(probability).any():
        scores["bayes"] = probability
        quality["bayes_gauc"] = gauc(requests, y, probability)
    per_request = paired_frame({name: request_metrics(requests, y, s) for name, s in scores.items()})
    return quality, per_request


def label_intervals(per_request: dict, n_boot: int = 1000) -> dict:
    """Mean over worlds of the labels' (and the Bayes ceiling's) pooled AUC and per-request GAUC with 95%
    intervals from the hierarchical bootstrap over worlds and validation requests
    (:mod:`gpl_platform.evaluation.uncertainty`): the level is 0.5 plus the difference to chance.
    ``per_request``: ``{world: validation_label_quality's frame}``."""
    frames = {(world, 0): frame for world, frame in per_request.items() if len(frame)}
    if not frames:
        return {}
    present = set.intersection(*({c.split(":", 1)[0] for c in f.columns} for f in frames.values()))
    out = {}
    for name in ("labels", "bayes"):
        if name not in present:
            continue
        for metric in ("auc", "gauc"):
            entry = paired_bootstrap(frames, name, CHANCE, metric, n_boot=n_boot)
            lo, hi = entry["ci95"]
            out[f"{'pseudo_label' if name == 'labels' else 'bayes'}_{metric}"] = {
                "mean": None if entry["diff"] is None else 0.5 + entry["diff"],
                "ci95": [None if lo is None else 0.5 + lo, None if hi is None else 0.5 + hi],
                "n_worlds": entry["n_worlds"],
                "n_requests": entry["n_requests"],
            }
    return out


def exposed_only_auc(report: dict, preranker: str) -> float | None:
    """exposed_only's AUC on the validation days' labelled unexposed candidates, from the evaluation report's
    ceiling (``valid`` window, main anchors, all candidates); None without it."""
    for row in (report.get("ceiling") or {}).get("rows", []):
        if (row["window"], row["anchors"], row["segment"]) == ("valid", "main", "all"):
            value = row.get(f"exposed_only_auc[{preranker}]")
            return None if value is None or not np.isfinite(value) else float(value)
    return None


def _difference(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    lo = entry["ci95"][0]
    return {"diff": entry["diff"], "ci95": entry["ci95"], "above_zero": lo is not None and lo > 0}


def content_share(summary: dict, preranker: str) -> dict:
    """From a size's sweep entry (:func:`gpl_platform.evaluation.bias_sweep.summarize_setting`): gpl minus the
    best control on the headline metric with its 95% paired interval (the bar: the interval above 0), gpl minus
    exposed_only likewise, and every method's headline metric."""
    shape = summary["prerankers"][preranker]
    best_control = shape["gpl_helps"]["best_control"]
    against_control = _difference(find_comparison(shape["comparisons"], best_control, HEADLINE_METRIC))
    return {
        "metric": HEADLINE_METRIC,
        "best_control": best_control,
        "gpl_minus_best_control": against_control,
        "clears_bar": bool(against_control and against_control["above_zero"]),
        "gpl_minus_exposed_only": _difference(find_comparison(shape["comparisons"], "exposed_only", HEADLINE_METRIC)),
        "methods": {m: entry.get(HEADLINE_METRIC) for m, entry in shape["methods"].items()},
    }


def _trend(ordered: list[dict], value) -> dict:
    """How a number moves from the smallest to the largest size: its values, the change, Spearman's rho against
    the size order, and ``rises`` (both positive; None with fewer than two sizes that have it)."""
    points = [(s["size"], value(s)) for s in ordered]
    points = [(name, float(v)) for name, v in points if v is not None and np.isfinite(v)]
    trend = {"values": dict(points), "change": None, "spearman": None, "rises": None}
    if len(points) >= 2:
        values = [v for _, v in points]
        rho = spearmanr(np.arange(len(values)), values).statistic
        trend["change"] = values[-1] - values[0]
        trend["spearman"] = None if not np.isfinite(rho) else float(rho)
        trend["rises"] = bool(trend["change"] > 0 and (trend["spearman"] or 0) > 0)
    return trend


def _get(entry: dict | None, *keys):
    for key in keys:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def reading(sizes: list[dict]) -> dict:
    """What the numbers say, computed from them: sizes in order of users x days, whether label AUC, content share
    and gpl minus exposed_only rise with size, the sizes whose content share clears the bar and the smallest, and
    for the largest size the labels against exposed_only's own ranking and the Bayes ceiling."""
    ordered = sorted(sizes, key=lambda s: (s["users"] * s["days"], s["users"]))
    measured = [s for s in ordered if s.get("content")]
    clearing = [s["size"] for s in measured if s["content"]["clears_bar"]]
    largest = ordered[-1] if ordered else {}
    labels, bayes = _get(largest, "label_quality", "pseudo_label_auc"), _get(largest, "label_quality", "bayes_auc")
    model = _get(largest, "label_quality", "exposed_only_auc")
    return {
        "order": [s["size"] for s in ordered],
        "label_auc": _trend(ordered, lambda s: _get(s, "label_quality", "pseudo_label_auc")),
        "label_gauc": _trend(ordered, lambda s: _get(s, "label_quality", "pseudo_label_gauc")),
        "content_measured": bool(measured),
        "content_share": _trend(measured, lambda s: _get(s, "content", "gpl_minus_best_control", "diff")),
        "gpl_minus_exposed_only": _trend(measured, lambda s: _get(s, "content", "gpl_minus_exposed_only", "diff")),
        "generator_seconds": _trend(ordered, lambda s: _get(s, "cost", "generator_training", "seconds")),
        "anchor_seconds": _trend(ordered, lambda s: _get(s, "cost", "anchor_generation", "seconds")),
        "sizes_clearing_bar": clearing,
        "smallest_size_clearing_bar": clearing[0] if clearing else None,
        "largest_size": {
            "size": largest.get("size"),
            "label_auc_minus_exposed_only_auc": None if labels is None or model is None else labels - model,
            "bayes_auc_minus_label_auc": None if labels is None or bayes is None or np.isnan(bayes) else bayes - labels,
        },
    }


def plot_curve(curve: dict, path: Path) -> Path:
    """Two panels against users (points named USERSxDAYS): label AUC and GAUC with 95% intervals, the Bayes
    ceiling and exposed_only's AUC on the same candidates; content share (gpl minus the best control) and gpl
    minus exposed_only on unexposed GAUC with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(curve["sizes"], key=lambda s: (s["users"], s["days"]))
    users = np.array([s["users"] for s in sizes], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))

    def series(ax, entries, label, color, marker="o"):
        keep = [(u, e) for u, e in zip(users, entries) if e is not None and e.get("mean", e.get("diff")) is not None]
        if not keep:
            return
        x = np.array([u for u, _ in keep])
        mid = np.array([e.get("mean", e.get("diff")) for _, e in keep], dtype=float)
        lo = np.array([np.nan if e["ci95"][0] is None else e["ci95"][0] for _, e in keep], dtype=float)
        hi = np.array([np.nan if e["ci95"][1] is None else e["ci95"][1] for _, e in keep], dtype=float)
        errors = np.nan_to_num(np.vstack([mid - lo, hi - mid]))
        ax.errorbar(x, mid, yerr=errors, fmt=f"{marker}-", capsize=3, label=label, color=color)

    intervals = [s["label_quality"].get("intervals", {}) for s in sizes]
    series(left, [i.get("pseudo_label_auc") for i in intervals], "pseudo-label AUC", "C0")
    series(left, [i.get("pseudo_label_gauc") for i in intervals], "pseudo-label GAUC (per request)", "C1", "s")
    series(left, [i.get("bayes_auc") for i in intervals], "Bayes ceiling AUC", "C2", "^")
    model = [(u, s["label_quality"].get("exposed_only_auc")) for u, s in zip(users, sizes)]
    model = [(u, v) for u, v in model if v is not None]
    if model:
        left.plot(*zip(*model), "d--", color="C3", label=f"exposed_only AUC ({curve['preranker']})")
    left.set_ylabel("AUC vs oracle (validation, unexposed)")
    series(
        right, [_get(s, "content", "gpl_minus_best_control") for s in sizes], "content share: gpl - best control", "C0"
    )
    series(right, [_get(s, "content", "gpl_minus_exposed_only") for s in sizes], "gpl - exposed_only", "C1", "s")
    right.axhline(0, color="grey", lw=1, ls="--")
    left.set_title("pseudo-label quality, 95% intervals", fontsize=10)
    right.set_title("gpl against the controls and exposed_only, 95% intervals", fontsize=10)
    right.set_ylabel(f"difference in {HEADLINE_METRIC} (test)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(set(users)), [f"{u:,.0f}" for u in sorted(set(users))])
        ax.set_xlabel("users (points: USERSxDAYS)")
        for u, s in zip(users, sizes):
            ax.annotate(
                s["size"],
                (u, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=7,
                ha="center",
                color="grey",
            )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{curve['source']} {curve['setting']}: learning curve (worlds {curve['worlds']}, seeds {curve['seeds']})"
    )
    fig.tight_layout()
    return save_figure(fig, path)
