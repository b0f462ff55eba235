"""The learning curve (issue 32, item 2; docs/EVALUATION.md, "Learning curve"): label quality and GPL's content
share as the simulator's world grows, with the generator's cost beside them.

    gpl bench learning-curve --size 500x14 --size 2000x30 --size 5000x60 --out reports/learning_curve.json

Each size (users x days of the simulator; the catalog stays the setting's) runs one bias-sweep setting
(``logging_10`` by default) per world seed through the sweep's own machinery (``bench_bias_sweep.world_overrides``,
``run_world``, ``summarize_worlds``), untuned, with ``exposed_only``, ``gpl`` and the content controls only. Its
world lives in ``<data-root>/<setting>/<USERS>x<DAYS>/world-<seed>``, which a run that does not resume starts
empty (cached anchors or generators would make the cost read zero); only the item vectors are copied from the
size before. The asset graph runs in timed stages: data, the semantic-ID generator (RQ-VAE and the generator's
refits, with ``sid`` anchors), anchor generation, the rest of the labelling chain, and (unless ``content`` is
off) the features and the offline evaluation. ``resume`` reuses what a size's world already recorded
(``reports/learning_curve_size.json``, its validation requests' statistics and, for the content share, its
evaluation report) and runs only what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_bias_sweep as sweep  # noqa: E402

log = logging.getLogger("gpl.learning_curve")
SOURCE = "simulator"
DEFAULT_SETTING = "logging_10"
DEFAULT_PRERANKER = "mlp:prerank_v2"
DEFAULT_WORLDS = (42,)
DEFAULT_SEEDS = (0,)
#: what a size's world records, beside its evaluation report
RECORD = "learning_curve_size.json"
REQUESTS = "learning_curve_validation_requests.parquet"
#: the anchor-ablation tables: only gpl_history_anchors and gpl_sid read them, not among the curve's methods
ABLATION_ASSETS = ("history_anchor_pseudo_labels", "sid_anchor_pseudo_labels")
GENERATOR_ASSETS = ("item_semantic_ids", "sid_generator")
ANCHOR_ASSETS = ("user_anchors",)
#: what each timed stage is (the JSON's protocol says it too)
TIMED = {
    "data": "ingestion (catalog, users, events, histories) and the item vectors",
    "generator_training": "semantic IDs (RQ-VAE) and every refit of the SID generator serving the days (sid anchors)",
    "anchor_generation": "user_anchors over every day: the configured backend writes each user-day's anchors",
    "labels": "anchor vectors, similarities, calibrations, pseudo-labels and their blocking checks",
    "training": "features, Feast, and the offline evaluation (every method x seed trained and scored)",
}


def pipeline_stages(all_keys: list[str], backend: str, content: bool) -> dict[str, list[str]]:
    """The sweep's asset selection cut into the timed stages, in order. Without ``sid`` anchors nothing reads the
    semantic IDs (no generator stage); without ``content`` no feature or evaluation asset runs."""
    from assets.graph import LABELLING_ASSETS

    cut = LABELLING_ASSETS.index(ANCHOR_ASSETS[0])
    stages = {
        "data": list(LABELLING_ASSETS[:cut]),
        "generator_training": list(GENERATOR_ASSETS) if backend == "sid" else [],
        "anchor_generation": list(ANCHOR_ASSETS),
        "labels": list(LABELLING_ASSETS[cut + 1 :]),
    }
    if content:
        taken = {*LABELLING_ASSETS, *GENERATOR_ASSETS, *ABLATION_ASSETS}
        stages["training"] = [k for k in all_keys if k not in taken]
    return {name: keys for name, keys in stages.items() if keys}


def _labels_key(overrides: dict) -> str:
    """What the labels of a world depend on: its settings but the evaluation's and training's."""
    kept = {k: v for k, v in overrides.items() if k not in ("evaluation", "training")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def world_facts(warehouse) -> dict:
    """Users, days, items, requests and candidates of a world, read from its warehouse."""
    one = warehouse.query(
        "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM items) AS items, "
        "count(DISTINCT day) AS days, count(DISTINCT request_id) AS requests, count(*) AS candidates, "
        "count(*) FILTER (WHERE exposed) AS exposed FROM events"
    ).iloc[0]
    return {k: int(v) for k, v in one.items()}


def generator_facts(warehouse) -> dict:
    """The SID generators the world trained: how many, their summed training seconds, the largest one's positives."""
    from gpl_platform.pseudo_labels.semantic_ids.store import stored_generators

    table = stored_generators(warehouse)
    if table.empty:
        return {"models": 0, "train_seconds": 0.0, "max_positives": 0}
    return {
        "models": int(len(table)),
        "train_seconds": round(float(table["train_seconds"].fillna(0).sum()), 2),
        "max_positives": int(table["positives"].max()),
    }


def run_size_world(settings, overrides: dict, label: str, content: bool, resume: bool, previous, spec: dict):
    """One world of one size: ``(record, validation requests' statistics, evaluation report or None)``. The record
    holds the world's facts, each stage's cost, the label quality and what was ``resumed``; with ``resume``, the
    labelling part is read from the world's record and only a missing evaluation runs."""
    import pandas as pd

    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.evaluation.learning_curve import validation_label_quality
    from gpl_platform.evaluation.report import write_json
    from gpl_platform.thresholds import quality_config

    data_dir = Path(settings.data_dir)
    record_path, requests_path = data_dir / "reports" / RECORD, data_dir / "reports" / REQUESTS
    report_path = data_dir / "reports" / "offline_eval.json"
    key = _labels_key(overrides)
    record = json.loads(record_path.read_text()) if resume and record_path.exists() else None
    if record is not None and (record.get("labels_key") != key or not requests_path.exists()):
        log.info("%s: %s was made with other settings: the world runs again", label, record_path)
        record = None
    stages = pipeline_stages(spec["all_keys"], settings.anchors.backend, content)
    resumed = {"labels": record is not None, "evaluation": False}
    if record is None:
        if data_dir.exists():
            log.info("%s: %s is emptied first, so that its generator's cost is measured from scratch", label, data_dir)
            shutil.rmtree(data_dir)
        labelling = {k: v for k, v in stages.items() if k != "training"}
        done = sweep.run_world(settings, labelling, previous, label, cache_tables=("item_embeddings",))
        warehouse = Warehouse.for_settings(settings)
        log.info("%s: label quality on the validation days", label)
        gate = quality_config(settings).pseudo_labels
        quality, per_request = validation_label_quality(warehouse, settings.training, settings.evaluation, gate)
        requests_path.parent.mkdir(parents=True, exist_ok=True)
        per_request.to_parquet(requests_path)
        record = {
            "labels_key": key,
            "world": world_facts(warehouse),
            "generators": generator_facts(warehouse) if "generator_training" in stages else None,
            "stages": done["stages"],
            "failed_checks": done["failed_checks"],
            "reused_work": done["reused"],
            "label_quality": quality,
        }
        write_json(record, record_path)
    report = None
    if content:
        report = sweep.finished_report(report_path, spec["methods"], [spec["preranker"]], spec["seeds"], tune=False)
        resumed["evaluation"] = report is not None
        if report is None:
            done = sweep.run_world(settings, {"training": stages["training"]}, None, label, cache_tables=())
            if done["reports"].get("offline_evaluation") != report_path:
                raise RuntimeError(f"{label}: the pipeline did not produce {report_path}")
            report = json.loads(report_path.read_text())
            record["stages"]["training"] = done["stages"]["training"]
            record["failed_checks"] += done["failed_checks"]
            write_json(record, record_path)
    if not content:  # a resumed world's evaluation is not part of a labels-only curve
        record = {**record, "stages": {k: v for k, v in record["stages"].items() if k != "training"}}
    return {**record, "resumed": resumed}, pd.read_parquet(requests_path), report


def _stage_cost(per_world: dict, stage: str) -> dict | None:
    """Mean seconds and CPU seconds of a stage over the worlds that ran it."""
    runs = [w["stages"][stage] for w in per_world.values() if stage in w["stages"]]
    if not runs:
        return None
    return {k: round(sum(r[k] for r in runs) / len(runs), 2) for k in ("seconds", "cpu_seconds")}


def size_entry(users: int, days: int, per_world: dict, requests: dict, reports: dict, frames: dict, spec: dict):
    """One size of the curve: its worlds' facts, label quality (mean over worlds, with intervals), cost, and
    with evaluation reports the content share."""
    from gpl_platform.evaluation import learning_curve as lc
    from gpl_platform.evaluation.prerankers import PreRankerSpec

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    qualities = [w["label_quality"] for w in per_world.values()]
    quality = {
        k: mean([q.get(k) for q in qualities])
        for k in ("pseudo_label_auc", "pseudo_label_auc_mean_pool", "pseudo_label_gauc", "bayes_auc", "bayes_gauc")
    }
    quality["intervals"] = lc.label_intervals(requests)
    name = PreRankerSpec.parse(spec["preranker"]).name
    quality["exposed_only_auc"] = mean([lc.exposed_only_auc(r, name) for r in reports.values()]) if reports else None
    first = next(iter(per_world.values()))
    entry = {
        "size": lc.size_name(users, days),
        "users": users,
        "days": days,
        "items": first["world"]["items"],
        "validation": {
            k: sum(w["label_quality"][k] for w in per_world.values())
            for k in ("candidates", "unexposed", "labelled_unexposed")
        },
        "label_quality": quality,
        "cost": {stage: _stage_cost(per_world, stage) for stage in TIMED},
        "content": None,
        "per_world": per_world,
    }
    generators = [w["generators"] for w in per_world.values() if w.get("generators")]
    entry["cost"]["generator_models"] = mean([g["models"] for g in generators]) if generators else None
    entry["cost"]["generator_train_seconds_recorded"] = mean([g["train_seconds"] for g in generators])
    if reports:
        summary = sweep.summarize_worlds(reports, frames, [spec["preranker"]], {"overrides": {}}, list(reports))
        entry["content"] = lc.content_share(summary, name)
        entry["content"]["skipped_methods"] = {
            str(w): r["prerankers"][name]["skipped_methods"] for w, r in reports.items()
        }
    return entry


def run(
    sizes: list,
    out: Path | None = None,
    setting: str = DEFAULT_SETTING,
    worlds: list[int] | None = None,
    seeds: list[int] | None = None,
    preranker: str = DEFAULT_PRERANKER,
    data_root: Path | None = None,
    resume: bool = False,
    content: bool = True,
    extra_overrides: dict | None = None,
) -> dict:
    """The curve over ``sizes`` (``"USERSxDAYS"`` strings or ``(users, days)``), written to ``out`` (JSON, and the
    plot beside it) after every size."""
    import pandas as pd

    from gpl_platform.config import PROJECT_ROOT, load_settings
    from gpl_platform.evaluation import bias_sweep
    from gpl_platform.evaluation import learning_curve as lc
    from gpl_platform.evaluation.scores import scores_path

    parsed = lc.parse_sizes([s if isinstance(s, str) else lc.size_name(*s) for s in sizes])
    bias_sweep.setting_overrides(SOURCE, setting, Path("."))  # an unknown setting fails before any work
    root = Path(data_root or PROJECT_ROOT / "data" / "learning_curve" / SOURCE).resolve()
    worlds, seeds = list(worlds or DEFAULT_WORLDS), list(seeds or DEFAULT_SEEDS)
    spec = {
        "methods": lc.curve_methods(),
        "preranker": preranker,
        "seeds": seeds,
        "all_keys": sweep.sweep_selection(SOURCE),  # the sweep's selection, cut into stages per world
    }
    began = time.perf_counter()
    curve: dict = {
        "source": SOURCE,
        "setting": setting,
        "preranker": preranker,
        "methods": spec["methods"],
        "worlds": worlds,
        "seeds": seeds,
        "content": content,
        "protocol": None,
        "sizes": [],
    }
    previous = None
    for users, days in parsed:
        name = lc.size_name(users, days)
        per_world, requests, reports, frames = {}, {}, {}, {}
        for world in worlds:
            label = f"size {name}, world {world}"
            extra = bias_sweep.deep_merge(
                copy.deepcopy(extra_overrides or {}), {"simulator": {"n_users": users, "n_days": days}}
            )
            data_dir = root / setting / name / f"world-{world}"
            overrides = sweep.world_overrides(
                SOURCE, setting, world, data_dir, spec["methods"], [preranker], seeds, extra, tune=False
            )
            settings = load_settings(overrides)
            if curve["protocol"] is None:
                curve["protocol"] = protocol(settings, overrides)
            log.info("%s: %s", label, "resuming" if resume else "running")
            record, requests[world], report = run_size_world(
                settings, overrides, label, content, resume, previous, spec
            )
            per_world[str(world)] = {**record, "data_dir": str(data_dir)}
            if report is not None:
                reports[world] = report
                frames[world] = pd.read_parquet(scores_path(data_dir / "reports" / "offline_eval.json"))
            previous = settings.warehouse
        entry = size_entry(users, days, per_world, requests, reports, frames, spec)
        curve["sizes"].append(entry)
        log.info(
            "size %s: label AUC %s, content share %s",
            name,
            entry["label_quality"]["pseudo_label_auc"],
            (entry["content"] or {}).get("gpl_minus_best_control"),
        )
        curve["reading"] = lc.reading(curve["sizes"])
        curve["seconds"] = round(time.perf_counter() - began, 1)
        if out:  # after every size: a long run shows its curve so far
            write(curve, Path(out))
    return curve


def protocol(settings, overrides: dict) -> dict:
    """What every size shares and what was measured how (written once, from the first size's settings)."""
    sim = settings.simulator
    return {
        "sizes": "USERSxDAYS: simulator.n_users x simulator.n_days",
        "items": f"fixed: simulator.n_items = {sim.n_items} at every size (the same catalog)",
        "fixed": {
            "requests_per_user_per_day": sim.requests_per_user_per_day,
            "candidates_per_request": sim.candidates_per_request,
            "exposure_share": sim.exposure_share,
            "exposure_policy": sim.exposure.policy,
        },
        "anchors_backend": settings.anchors.backend,
        "overrides": {k: v for k, v in overrides.items() if k not in ("data_dir", "evaluation", "seed", "simulator")},
        "tuned": False,
        "label_quality": "main pseudo-labels against the oracle on the validation days of the evaluation's time "
        "split: unexposed candidates with a pseudo-label on days the blocking gate passes (the ceiling's valid "
        "window); AUC pooled, GAUC per request; intervals: hierarchical bootstrap over worlds and requests",
        "exposed_only_auc": "from the evaluation report's ceiling: the first seed's exposed_only model on the same "
        "candidates",
        "content_share": "gpl minus the best control on unexposed_gauc (test days), 95% paired interval over worlds, "
        "seeds and test requests; the bar: the interval above 0",
        "timed": {
            **TIMED,
            "how": "wall and CPU seconds (this process, all threads) of each stage's Dagster run, in process; "
            "generator_train_seconds_recorded: the generators' own training seconds, as stored with them",
        },
        "cache": "each size's world starts empty; only item vectors are copied from the size before",
    }


def write(curve: dict, out: Path) -> dict[str, Path]:
    """The JSON (atomically) and the plot beside it (``<stem>.png``)."""
    from gpl_platform.evaluation.learning_curve import plot_curve
    from gpl_platform.evaluation.report import write_json

    write_json(curve, out)
    return {"json": out, "plot": plot_curve(curve, out.with_suffix(".png"))}
