"""The bias sweep: every protocol setting of a source through the whole asset graph and the offline
evaluation, GPL's lift against the bias (docs/EVALUATION.md, "The settings of the bias sweep").

    gpl bench bias-sweep --source simulator --out reports/bias_sweep_simulator.json

Each setting gets its own warehouse under ``<data-root>/<setting>`` (default
``data/bias_sweep/<source>``); anchors of identical histories and the item vectors are copied from
the setting before (work that does not depend on exposure). Runs go to an ephemeral Dagster
instance: this is a benchmark, not the product's history of runs. With ``resume``, a setting whose
evaluation report already exists for the same methods, pre-rankers and seeds is read, not run again
(a sweep takes hours; an interrupted one continues where it stopped).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpl.bias_sweep")
#: a pre-ranker trains on the exposed part only when training_set / prerank_model run: the sweep skips them
SKIPPED_ASSETS = ("training_set", "prerank_model", "label_audit")
DEFAULT_PRERANKERS = ("mlp:prerank_v2", "two_tower:prerank_scalar_v2", "cold:prerank_scalar_v2")


def run(
    source: str,
    out: Path | None = None,
    settings: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    prerankers: list[str] | None = None,
    data_root: Path | None = None,
    extra_overrides: dict | None = None,
    results_doc: Path | None = None,
    resume: bool = False,
    worlds: list[int] | None = None,
    tune: bool = True,
) -> dict:
    from gpl_platform.config import PROJECT_ROOT, load_settings
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import dataset_statistics
    from gpl_platform.evaluation import bias_sweep
    from gpl_platform.evaluation.scores import scores_path

    names = settings or list(bias_sweep.SWEEP_SETTINGS[source])
    root = Path(data_root or PROJECT_ROOT / "data" / "bias_sweep" / source).resolve()
    methods = list(methods or bias_sweep.SWEEP_METHODS)
    prerankers = list(prerankers or DEFAULT_PRERANKERS)
    selection = sweep_selection(source)
    began = time.perf_counter()
    sweep: dict = {"source": source, "seeds": seeds, "methods": methods, "prerankers": prerankers, "settings": {}}
    previous: Path | None = None
    # the simulator draws a new world for each seed; MovieLens is one dataset (its protocol seeds vary the
    # recall and exposure draws, which the world seeds then do)
    worlds = list(worlds or DEFAULT_WORLDS[source])
    for name in names:
        started = time.perf_counter()
        reports, frames, protocol = {}, {}, {}
        for world in worlds:
            data_dir = root / name / f"world-{world}"
            overrides = world_overrides(
                source, name, world, data_dir, methods, prerankers, seeds, extra_overrides, tune
            )
            settings_obj = load_settings(overrides)
            report_path = settings_obj.data_dir / "reports" / "offline_eval.json"
            report = finished_report(report_path, methods, prerankers, seeds, tune) if resume else None
            reused, failed_checks, resumed = {}, None, report is not None  # a resumed run's checks are not known
            if report is None:
                done = run_world(settings_obj, {"pipeline": selection}, previous, f"setting {name}, world {world}")
                if done["reports"].get("offline_evaluation") != report_path:
                    raise RuntimeError(f"setting {name}, world {world}: the pipeline did not produce {report_path}")
                report = json.loads(report_path.read_text())
                reused, failed_checks = done["reused"], done["failed_checks"]
            reports[world] = report
            scores = pd.read_parquet(scores_path(report_path))
            frames[world] = scores
            dataset = load_source(settings_obj)
            protocol.setdefault(
                "overrides", {k: v for k, v in overrides.items() if k not in ("data_dir", "evaluation", "seed")}
            )
            protocol.setdefault("per_world", {})[str(world)] = {
                "statistics": dataset_statistics(dataset),
                "exposure_policy": dataset.info.get("exposure", {}),
                "failed_checks": failed_checks,
                "reused_work": reused,
                "resumed": resumed,
                "tuning": report.get("tuning"),
            }
            previous = settings_obj.warehouse
        protocol["seconds"] = round(time.perf_counter() - started, 1)
        protocol["tuned"] = tune
        sweep["settings"][name] = summarize_worlds(reports, frames, prerankers, protocol, worlds)
        sweep["seeds"] = sweep["settings"][name]["seeds"]
    sweep["seconds"] = round(time.perf_counter() - began, 1)
    if out:
        write(sweep, Path(out), results_doc)
    return sweep


#: world seeds of a setting: 3 simulator worlds; MovieLens is one dataset (more seeds vary its protocol's draws)
DEFAULT_WORLDS = {"simulator": (42, 7, 13), "movielens-100k": (42,)}


def sweep_selection(source: str) -> list[str]:
    """The asset keys a setting materializes: the whole graph but :data:`SKIPPED_ASSETS`."""
    from assets.graph import build_definitions
    from gpl_platform.config import load_settings

    return [
        k.to_user_string()
        for k in build_definitions(load_settings({"source": source})).resolve_all_asset_keys()
        if k.to_user_string() not in SKIPPED_ASSETS
    ]


def world_overrides(
    source: str,
    setting: str,
    world: int,
    data_dir: Path,
    methods: list[str],
    prerankers: list[str],
    seeds: list[int] | None = None,
    extra_overrides: dict | None = None,
    tune: bool = True,
) -> dict:
    """The settings overrides of one world of a setting: the grid's (with ``extra_overrides``), its own data
    directory, the world seed, the evaluation's methods, pre-rankers and tuning, and the training seeds."""
    from gpl_platform.evaluation import bias_sweep

    overrides = bias_sweep.setting_overrides(source, setting, data_dir, extra_overrides)
    overrides = bias_sweep.deep_merge(
        overrides, {"seed": world, "evaluation": {"methods": methods, "prerankers": prerankers, "tune": tune}}
    )
    if seeds:
        overrides = bias_sweep.deep_merge(overrides, {"training": {"seeds": seeds}})
    return overrides


#: work another world already did that does not depend on its events (Warehouse.import_caches)
CACHE_TABLES = ("anchor_cache", "item_embeddings")


def cpu_seconds() -> float:
    """user + sys CPU seconds of this process, all its threads (the runs execute in process)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def run_world(
    settings_obj,
    stages: dict[str, list[str]],
    previous: Path | None,
    label: str,
    cache_tables: tuple[str, ...] = CACHE_TABLES,
) -> dict:
    """Materialize one world: copy ``cache_tables`` from the ``previous`` world's warehouse, then each stage's
    asset selection in order, in an ephemeral Dagster instance, each timed. Returns ``{"reused": rows copied
    per table, "failed_checks": count, "stages": {stage: {"seconds", "cpu_seconds"}}, "reports": {asset: JSON
    report path}}``; a failed stage raises (a failed quality check does not: its consumers skip the day)."""
    from assets.runner import run_pipeline
    from gpl_platform.data.warehouse import Warehouse

    warehouse = Warehouse.for_settings(settings_obj)
    reused = warehouse.import_caches(previous, cache_tables) if previous else {}
    log.info("%s: the asset graph into %s (reused: %s)", label, settings_obj.data_dir, reused)
    done: dict = {"reused": reused, "failed_checks": 0, "stages": {}, "reports": {}}
    for stage, selection in stages.items():
        began, cpu = time.perf_counter(), cpu_seconds()
        # the world's settings as a value: its partitions, resources and runs all follow them
        result = run_pipeline(settings=settings_obj, ephemeral=True, selection=selection)
        if not result.success:
            raise RuntimeError(f"{label}: stage {stage} of the pipeline failed")
        done["stages"][stage] = {
            "seconds": round(time.perf_counter() - began, 2),
            "cpu_seconds": round(cpu_seconds() - cpu, 2),
        }
        done["failed_checks"] += len(result.failed_checks)
        done["reports"].update(result.reports)
        log.info("%s: stage %s done in %.1fs", label, stage, done["stages"][stage]["seconds"])
    return done


def summarize_worlds(reports: dict, frames: dict, prerankers: list[str], protocol: dict, worlds: list) -> dict:
    """One setting's entry of the sweep JSON from its worlds' evaluation reports and test scores (``{world: ...}``):
    every run pooled, gpl against every other method per pre-ranker with intervals over the worlds."""
    from gpl_platform.evaluation import bias_sweep
    from gpl_platform.evaluation.prerankers import PreRankerSpec
    from gpl_platform.evaluation.scores import method_comparisons

    combined = bias_sweep.combine_worlds(reports)
    comparisons = {
        PreRankerSpec.parse(p).name: method_comparisons(frames, PreRankerSpec.parse(p).name) for p in prerankers
    }
    return bias_sweep.summarize_setting(combined, protocol, comparisons, worlds)


def finished_report(
    path: Path, methods: list[str], prerankers: list[str], seeds: list[int] | None, tune: bool = False
) -> dict | None:
    """The setting's evaluation report when it covers exactly these methods, pre-rankers and seeds, tuned or
    not as asked, else None."""
    from gpl_platform.evaluation.prerankers import PreRankerSpec

    if not path.exists():
        return None
    report = json.loads(path.read_text())
    wanted = {PreRankerSpec.parse(p).name for p in prerankers}
    have = set(report.get("prerankers", {}))
    if set(report.get("methods", {})) != set(methods) or have != wanted or (seeds and report.get("seeds") != seeds):
        log.info("%s covers other methods, pre-rankers or seeds: the setting runs again", path)
        return None
    if bool((report.get("tuning") or {}).get("tuned")) != tune:
        log.info("%s is %s: the setting runs again", path, "untuned" if tune else "tuned")
        return None
    return report


def write(sweep: dict, out: Path, results_doc: Path | None = None) -> dict[str, Path]:
    """The JSON, the lift plot beside it, and (optionally) the markdown section of a results document."""
    from gpl_platform.evaluation import bias_sweep_report
    from gpl_platform.evaluation.report import replace_generated_section, write_json

    out = write_json(sweep, out)
    plot = bias_sweep_report.plot_lift(sweep, out.with_name(f"{out.stem}_lift.png"))
    paths = {"json": out, "plot": plot}
    if results_doc:
        results_doc = Path(results_doc)
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
            or "unknown"
        )
        begin = f"<!-- bias-sweep:{sweep['source']}:begin (generated by gpl bench bias-sweep --results-doc) -->"
        end = f"<!-- bias-sweep:{sweep['source']}:end -->"
        command = "gpl bench bias-sweep " + " ".join(
            sys.argv[3:] if sys.argv[1:3] == ["bench", "bias-sweep"] else sys.argv[1:]
        )
        body = bias_sweep_report.markdown(sweep, command, commit, os.path.relpath(plot, results_doc.parent))
        paths["results_doc"] = replace_generated_section(results_doc, begin, end, f"{begin}\n\n{body}\n{end}")
    return paths


def lift_summary(sweep: dict) -> list[dict]:
    """The lines a person reads first: per setting and pre-ranker, GPL's unexposed-AUC lift in pooled stds."""
    from gpl_platform.evaluation.bias_sweep_report import lift_table

    table = lift_table(sweep)
    keep = [
        "setting",
        "preranker",
        "train_serving_gap",
        "gpl_lift_unexposed_auc",
        "gpl_lift_unexposed_auc_in_std",
        "gpl_lift_unexposed_hr@10_in_std",
        "best_baseline",
        "gpl_minus_best_baseline_unexposed_auc",
    ]
    return table[[c for c in keep if c in table]].round(4).to_dict(orient="records")
