"""Evaluation on logged data, for real logs that carry no oracle labels.

What logs allow: the click labels of the *exposed* test candidates (AUC, GAUC, HR@K among a request's
exposed candidates), and, where the log carries the logging policy's propensities, an inverse-
propensity estimate over the whole candidate set: IPS recall@K, the share of a request's positives
(exposed or not) that the model's top K of all candidates holds, estimated by weighting each exposed
click by 1/propensity (self-normalized, weights clipped at ``training.ips_clip``). It is unbiased when
exposure depends only on what the propensities describe; it cannot see unexposed positives directly.
The label audit (pseudo-labels against later real clicks) is reported next to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.data.policies import LoggingPolicies, exploration_mask
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.evaluation.exploration import SLICE_METRICS, interval_cell, slice_request_metrics, slice_section
from gpl_platform.evaluation.method_runs import (
    TrainingData,
    gated_pseudo_labels,
    item_categories,
    train_methods,
    with_propensity,
)
from gpl_platform.evaluation.metrics import auc, gauc, hit_rate_at_k
from gpl_platform.evaluation.prerankers import preranker_specs
from gpl_platform.evaluation.slice_audit import slice_label_audit
from gpl_platform.prerank import methods as registry
from gpl_platform.prerank.data import attach_features, id_vocabularies, load_candidates, time_split
from gpl_platform.prerank.model import ModelConfig
from gpl_platform.quality.gate import failing_event_days

log = logging.getLogger(__name__)
K = 10
LOGGED_METRICS = ("exposed_auc", "exposed_gauc", "exposed_hr@3", "exposed_hr@10", "ips_recall@10")


def has_ground_truth(warehouse: Warehouse) -> bool:
    """True when every ingested candidate has an oracle label (a benchmark source)."""
    if not warehouse.table_exists("oracle_labels"):
        return False
    counts = warehouse.query("SELECT count(*) AS n, count(oracle_label) AS known FROM oracle_labels")
    return bool(counts["n"].iloc[0]) and int(counts["known"].iloc[0]) == int(counts["n"].iloc[0])


def ips_recall_at_k(
    requests: np.ndarray,
    exposed: np.ndarray,
    clicked: np.ndarray,
    propensity: np.ndarray,
    scores: np.ndarray,
    k: int = K,
    clip: float = 20.0,
) -> float:
    """IPS estimate of recall@k over every candidate of each request: sum over exposed clicks in the
    top k of 1/p, over the sum over all exposed clicks of 1/p (pooled over requests)."""
    frame = pd.DataFrame(
        {
            "r": requests,
            "s": np.asarray(scores, float),
            "e": np.asarray(exposed, bool),
            "y": np.nan_to_num(np.asarray(clicked, float)),
            "w": np.minimum(1.0 / np.maximum(np.asarray(propensity, float), 1e-6), clip),
        }
    )
    frame = frame.sort_values(["r", "s"], ascending=[True, False], kind="stable")
    frame["top"] = frame.groupby("r").cumcount() < k
    positive = frame["e"] & (frame["y"] > 0)
    total = float(frame.loc[positive, "w"].sum())
    return float(frame.loc[positive & frame["top"], "w"].sum() / total) if total > 0 else float("nan")


def logged_metrics(test: pd.DataFrame, scores: np.ndarray, propensity_known: bool, clip: float) -> dict:
    exposed = test["exposed"].to_numpy(bool)
    y = test.loc[exposed, "clicked"].to_numpy(int)
    s, req, users = scores[exposed], test.loc[exposed, "request_id"].to_numpy(), test.loc[exposed, "user_id"].to_numpy()
    out = {
        "exposed_auc": auc(y, s),
        "exposed_gauc": gauc(users, y, s),
        "exposed_hr@3": hit_rate_at_k(req, y, s, 3),
        "exposed_hr@10": hit_rate_at_k(req, y, s, K),
    }
    out["ips_recall@10"] = (
        ips_recall_at_k(
            test["request_id"].to_numpy(),
            exposed,
            test["clicked"].to_numpy(float),
            test["propensity"].to_numpy(float),
            scores,
            K,
            clip,
        )
        if propensity_known
        else float("nan")
    )
    return out


def run_logged_evaluation(warehouse: Warehouse, store, settings, gates, progress: bool = False) -> dict:
    """Every method that has training rows, under every seed, scored on logged test data."""
    cfg, evaluation = settings.training, settings.evaluation
    began = time.perf_counter()
    split = time_split(warehouse, cfg.test_share, cfg.valid_share)
    # Days whose events fail their gate (broken labels) are left out of training and of measurement alike:
    # the split is made again without them, so the test days are the latest days that pass.
    bad_event_days = failing_event_days(
        warehouse,
        split.train_days + split.valid_days + split.test_days,
        gates.events,
        settings.streaming.batch_candidates,
    )
    if bad_event_days:
        try:
            split = time_split(warehouse, cfg.test_share, cfg.valid_share, exclude=bad_event_days)
        except ValueError as exc:
            raise ValueError(
                f"{len(bad_event_days)} day(s) fail the events gate and the rest is too small: {exc}"
            ) from None
    days = split.train_days + split.valid_days + split.test_days
    cands = load_candidates(warehouse, days)
    # The exploration slice never trains by default; it is then the test set (and the rest of the test days'
    # traffic gives the biased exposed-only metrics beside it).
    exploring = exploration_mask(cands, LoggingPolicies.from_settings(evaluation))
    slice_is_test = not evaluation.exploration_trains
    trains = ~exploring if slice_is_test else np.ones(len(cands), bool)
    masks = {
        "train": cands["day"].isin(set(split.train_days)).to_numpy() & trains,
        "valid": cands["day"].isin(set(split.valid_days)).to_numpy() & trains,
        "test": cands["day"].isin(set(split.test_days)).to_numpy(),
    }
    train, valid, test = (cands[masks[n]].reset_index(drop=True) for n in ("train", "valid", "test"))
    if train.empty and exploring.any():
        raise ValueError(
            "every candidate of the training days was served by an exploration policy, and the exploration slice "
            "is held out as the test set: set evaluation.exploration_trains=true to train on it (there is then no "
            "unbiased test set), or deliver production traffic"
        )
    test_slice = exploring[masks["test"]] & slice_is_test
    production = test[~test_slice]
    judged = [part for part in (production, test[test_slice]) if part.loc[part["exposed"], "clicked"].nunique() == 2]
    if not judged:
        raise ValueError(
            f"the test days {split.describe()['test_days']} need exposed candidates with both clicks and "
            "non-clicks to measure anything: deliver more days (or raise training.test_share)"
        )
    propensity_known = bool(len(production)) and bool(production.loc[production["exposed"], "propensity"].notna().all())
    methods = list(evaluation.methods)
    pseudo, refused = gated_pseudo_labels(warehouse, split.train_days, split.valid_days, methods, gates.pseudo_labels)
    user_vocab, item_vocab = id_vocabularies(warehouse)
    spec = preranker_specs(cfg, evaluation)[0]
    matrix, columns = attach_features(store, cands, spec.service)
    data = TrainingData(
        train=train,
        train_x=matrix[masks["train"]],
        columns=columns,
        valid=valid,
        valid_x=matrix[masks["valid"]],
        pseudo={name: frame[frame["day"].isin(set(split.train_days))] for name, frame in pseudo.items()},
        cfg=cfg,
        model_config=ModelConfig(shape=spec.shape, id_dim=cfg.id_embedding_dim),
        user_vocab=user_vocab,
        item_vocab=item_vocab,
    )
    data = with_propensity(data, methods)
    data.item_categories = item_categories(warehouse) if any(registry.method(m).teacher for m in methods) else None
    test_x = matrix[masks["test"]]
    runs: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    slice_rows = test[test_slice].reset_index(drop=True)
    per_seed: dict[int, dict] = {}
    for seed in cfg.seeds:
        for method, model, history in train_methods(data, methods, seed, skipped, refused):
            scores = model.predict(test_x, test["user_id"].to_numpy(), test["item_id"].to_numpy())
            metrics = logged_metrics(
                production.reset_index(drop=True), scores[~test_slice], propensity_known, cfg.ips_clip
            )
            if len(slice_rows):
                per_seed.setdefault(seed, {})[method] = slice_request_metrics(
                    slice_rows, scores[test_slice], cfg.ips_clip
                )
            runs.setdefault(method, []).append(
                {"seed": seed, **metrics, "rows": history["n_rows"], "pseudo_rows": history["n_pseudo"]}
            )
    if not runs:
        raise ValueError(
            f"no method has training rows over the {len(split.train_days)} training days: "
            + "; ".join(f"{m}: {why}" for m, why in skipped.items())
        )
    summary = {
        m: {
            k: {"mean": float(np.nanmean([r[k] for r in rs])), "std": float(np.nanstd([r[k] for r in rs]))}
            for k in LOGGED_METRICS
        }
        for m, rs in runs.items()
    }
    return {
        "kind": "logged",
        "dataset": settings.source,
        "seeds": list(cfg.seeds),
        "preranker": spec.name,
        "what": "no oracle labels: the exploration slice's clicks judge how a model orders every candidate "
        "('exploration'); beside it, biased, the production traffic's exposed test candidates' clicks; "
        "ips_recall@10 estimates recall over every candidate from exposed clicks weighted by 1/propensity"
        + ("" if propensity_known else " (not available: the log has no propensities)"),
        "methods": summary,
        "runs": runs,
        "skipped_methods": skipped,
        "split": split.describe(),
        "n_test_requests": int(test["request_id"].nunique()),
        "n_test_exposed": int(test["exposed"].sum()),
        "n_test_candidates": int(len(test)),
        "propensities": "logged" if propensity_known else "none",
        "ips_training_propensity": data.propensity_kind,
        "days_refused": {
            "events": sorted(map(str, bad_event_days)),
            **{f"pseudo_labels:{k}": v for k, v in refused.items()},
        },
        "label_audit": label_audit_summary(warehouse),
        "exploration": exploration_section(warehouse, per_seed, evaluation, slice_rows, exploring, masks),
        "seconds": round(time.perf_counter() - began, 1),
    }


def exploration_section(
    warehouse: Warehouse, per_seed: dict, evaluation, slice_rows: pd.DataFrame, exploring: np.ndarray, masks: dict
) -> dict:
    """The report's ``exploration`` entry: the slice's metrics per method (the headline of a real log), what
    the slice holds, and its check of the pseudo-labels (:func:`slice_label_audit`)."""
    base = {
        "policies": list(evaluation.exploration_policies),
        "rows": int(len(slice_rows)),
        "shown": int(slice_rows["exposed"].sum()) if len(slice_rows) else 0,
        "training_rows_held_out": int((exploring & ~masks["test"]).sum()) if not evaluation.exploration_trains else 0,
        "label_audit": slice_label_audit(warehouse, evaluation.exploration_policies),
    }
    if evaluation.exploration_trains:
        return {
            **base,
            "requests": 0,
            "methods": {},
            "note": "evaluation.exploration_trains: the slice trained, so it is not a test set",
        }
    if not per_seed:
        return {**base, "requests": 0, "methods": {}, "note": "the test days have no exploration traffic"}
    families = {m: registry.method(m).family for m in next(iter(per_seed.values()))}
    return {**base, **slice_section(per_seed, families, evaluation.min_exploration_requests)}


def label_audit_summary(warehouse: Warehouse) -> dict:
    """The label audit's headline numbers (pseudo-labels against later real clicks)."""
    from gpl_platform.pseudo_labels.audit import audit_warehouse

    try:
        summary = audit_warehouse(warehouse).summary
    except Exception as exc:  # no pseudo-labels yet: the report says so instead of failing
        return {"unavailable": str(exc).splitlines()[0]}
    return {
        k: (
            float(v)
            if isinstance(v, (float, np.floating)) and np.isfinite(v)
            else int(v)
            if isinstance(v, (int, np.integer))
            else str(v)
        )
        for k, v in summary.items()
    }


def results_table(report: dict) -> pd.DataFrame:
    rows = [
        {"method": m, **{k: f"{v[k]['mean']:.4f} ± {v[k]['std']:.4f}" for k in LOGGED_METRICS}}
        for m, v in report["methods"].items()
    ]
    rows += [{"method": m, LOGGED_METRICS[0]: f"skipped: {why}"} for m, why in report["skipped_methods"].items()]
    return pd.DataFrame(rows)


def exploration_table(section: dict) -> pd.DataFrame:
    """One row per method: the slice's metrics with their 95% intervals."""
    return pd.DataFrame(
        [
            {"method": m, **{k: interval_cell(v[k]) for k in SLICE_METRICS}}
            for m, v in section.get("methods", {}).items()
        ]
    )


def exploration_lines(section: dict) -> list[str]:
    """The markdown of the exploration slice: the headline of a real log's evaluation."""
    lines = ["## The exploration slice (unbiased: what was shown did not depend on the production system)", ""]
    if not section.get("methods"):
        return [*lines, f"- {section.get('note', 'no exploration traffic')}", ""]
    lines += [
        f"{section['requests']} exploration test requests, {section['shown']} shown candidates of {section['rows']} "
        f"(policies {', '.join(section['policies'])}); seeds' mean with a 95% interval over requests and seeds.",
        "",
        exploration_table(section).to_markdown(index=False),
        "",
    ]
    if "warning" in section:
        lines += [f"**Warning:** {section['warning']}.", ""]
    claim = section.get("gpl_helps")
    if claim:
        verdict = "helps" if claim["helps"] else "does not help"
        lines += [
            f"By the claim rule on the slice's GAUC, gpl {verdict} (best baseline {claim['best_baseline']}, "
            f"best control {claim['best_control']}).",
            "",
        ]
    return lines


def render_markdown(report: dict) -> str:
    audit = report.get("label_audit") or {}
    lines = [
        f"# Logged-data evaluation ({report['dataset']}, no oracle labels)",
        "",
        report["what"] + ".",
        "",
        f"Pre-ranker {report['preranker']}, seeds {report['seeds']}, split {json.dumps(report['split'])}; "
        f"{report['n_test_requests']} test requests, {report['n_test_exposed']} exposed test candidates of "
        f"{report['n_test_candidates']}.",
        "",
        *exploration_lines(report.get("exploration") or {}),
        "## Exposed test candidates of the production traffic (biased: only what the system chose to show)",
        "",
        results_table(report).to_markdown(index=False),
        "",
        "## Label audit (pseudo-labels vs later real clicks)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in audit.items()] or ["- no audit yet"]
    return "\n".join(lines) + "\n"


def evaluate_and_write(warehouse: Warehouse, store, settings, gates) -> tuple[dict, dict[str, Path]]:
    report = run_logged_evaluation(warehouse, store, settings, gates)
    out = settings.data_dir / "reports" / "logged_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out, json.dumps(report, indent=2, default=str) + "\n"),
        (out.with_suffix(".md"), render_markdown(report)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return report, {"json": out, "markdown": out.with_suffix(".md")}
