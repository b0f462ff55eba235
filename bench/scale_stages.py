"""The world of `gpl bench scale` and its stages, each run in a fresh process.

:func:`world_env` is the settings of a simulator world of about N candidates, read by the platform as a daily
contract delivery (the ``simulate`` stage writes it). ``python bench/scale_stages.py --stage <stage> --result
<json>`` runs one stage of :data:`STAGES` in the process ``bench/bench_scale.py``'s ``run_stage`` starts and
measures, and writes what the stage did, its seconds, CPU seconds and peak RSS, and for a pseudo-label stage the
labels' digest (:func:`label_digest`). The labelling stages run through
:class:`~gpl_platform.pseudo_labels.chain.LabellingChain`, as the Dagster assets do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HISTORY_STAGES = ["anchors_history", "embeddings_history", "similarities_history", "pseudo_labels_history"]
SID_STAGES = ["sid_training", "anchors_sid", "embeddings_sid", "similarities_sid", "pseudo_labels_sid"]
# `simulate` is the benchmark's data generator (the simulator's world in memory, written as a daily contract
# delivery); `ingestion` onwards is the platform, reading that delivery a day at a time as a daily run does.
GENERATOR_STAGES = ["simulate"]
STAGES = [
    "simulate",
    "ingestion",
    "item_embeddings",
    *HISTORY_STAGES,
    *SID_STAGES,
    "features",
    "materialization",
    "training_set",
]


# ---- the world and its settings ---------------------------------------------------------------


def world_env(candidates: int, days: int, per_request: int, items: int, data_dir: Path, extra: dict) -> dict:
    users = max(10, round(candidates / (per_request * days)))
    env = {
        # the platform reads the simulator's world as a daily contract delivery (the `simulate` stage writes it)
        "GPL_SOURCE": "contract",
        "GPL_CONTRACT__PATH": str(data_dir / "contract"),
        "GPL_DATA_DIR": str(data_dir),
        "GPL_SEED": "0",
        "GPL_SIMULATOR__N_USERS": str(users),
        "GPL_SIMULATOR__N_ITEMS": str(items),
        "GPL_SIMULATOR__N_DAYS": str(days),
        "GPL_SIMULATOR__CANDIDATES_PER_REQUEST": str(per_request),
        "GPL_SIMULATOR__REQUESTS_PER_USER_PER_DAY": "1.0",
        # 2024-01-04 is a refit day of a 7-day grid: days 4..7 get a generator trained on days 1..3
        "GPL_SIMULATOR__START_DATE": "2024-01-01",
        "GPL_SID__GENERATOR__RETRAIN_EVERY_DAYS": "7",
        "GPL_SIMULATOR__EXPOSURE__PROPENSITY_SAMPLES": "0",
        "GPL_ANCHORS__BACKEND": "history",
        "GPL_WAREHOUSE_LOCK_TIMEOUT_S": "600",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "TQDM_DISABLE": "1",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---- one stage, inside its process -------------------------------------------------------------


def _run_stage(stage: str) -> dict:
    from dataclasses import asdict
    from datetime import timedelta

    from gpl_platform.config import load_settings
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.engine import make_engine
    from gpl_platform.pseudo_labels.chain import LabellingChain
    from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder
    from gpl_platform.pseudo_labels.stages import StageTables

    settings = load_settings()
    warehouse = Warehouse.for_settings(settings)
    engine = make_engine(settings)
    encoder = sentence_encoder(None)
    start = settings.simulator.start_date
    from datetime import date

    first = date.fromisoformat(start)
    days = [first + timedelta(n) for n in range(settings.simulator.n_days)]
    out: dict = {}
    variant, backend = ("sid", "sid") if stage.endswith("_sid") else ("main", "history")
    tables = StageTables(variant)

    def generator():
        return anchor_generator(settings, backend)

    def chain() -> LabellingChain:
        return LabellingChain.build(settings, warehouse, engine, generator(), encoder, first, tables=tables)

    if stage == "simulate":
        from gpl_platform.data.sources import load_source
        from gpl_platform.data.stats import export_contract_dir

        dataset = load_source(load_settings({"source": "simulator"}))
        written = export_contract_dir(dataset, settings.contract.path, by_day=True)
        out.update(candidates=len(dataset.events), files=len(written))
    elif stage == "ingestion":
        from gpl_platform.data import ingestion
        from gpl_platform.data.delivery_chunks import delivered_item_ids
        from gpl_platform.data.sources import delivered_day_events, load_source

        signature = settings.source_signature()
        delivered = delivered_item_ids(settings.contract.path, settings.streaming.duckdb_memory_limit)
        ingestion.ingest_catalog(warehouse, load_source(settings, days=[]), signature, delivered)
        # as the catalog and candidate_events runs do: every day validated first, then written a day at a time,
        # each day in chunks
        ingestion.ingest_delivered_days(warehouse, lambda: delivered_day_events(settings, days), signature)
        ingestion.build_user_histories(warehouse, days, first, settings.history_max_len)
        out["candidates"] = int(warehouse.query("SELECT count(*) AS n FROM events")["n"].iloc[0])
        out["user_days"] = int(warehouse.query("SELECT count(*) AS n FROM user_histories")["n"].iloc[0])
    elif stage == "item_embeddings":
        from gpl_platform.pseudo_labels.encoder import update_item_embeddings

        items = warehouse.query("SELECT item_id, text FROM items")
        with warehouse.connect() as con:
            out.update({k: v for k, v in update_item_embeddings(con, items, encoder).items() if k != "encoder_id"})
    elif stage == "sid_training":
        from gpl_platform.pseudo_labels.semantic_ids.store import build_semantic_ids

        build_semantic_ids(
            warehouse, encoder.encoder_id, settings.sid.semantic_ids, settings.seed, settings.artifacts_dir
        )
        family = anchor_generator(settings, "sid")
        out["models"] = sorted({family.for_day(d).model_id for d in days})
    elif stage.startswith("anchors_"):
        anchors = chain().anchors(days)
        out.update(anchors=anchors.anchors, cache_hits=anchors.cache_hits, cache_misses=anchors.cache_misses)
    elif stage.startswith("embeddings_"):
        out.update(asdict(chain().embeddings(days)))
    elif stage.startswith("similarities_"):
        out.update(asdict(chain().similarities(days)))
    elif stage.startswith("pseudo_labels_"):
        labels = chain().labels(days)
        out.update(rows=labels.rows, batches=labels.batches, digest_table=tables.labels)
    elif stage == "features":
        from gpl_platform.features import pipeline

        pipeline.write_profile_features(settings, warehouse)
        out["user_rows"] = pipeline.write_user_features(settings, warehouse, days, first)["rows"]
        out["item_rows"] = pipeline.write_item_features(settings, warehouse, days, first)["rows"]
    elif stage == "materialization":
        from gpl_platform.features import pipeline
        from gpl_platform.features.store import FeastStore

        store = FeastStore(settings)
        store.apply_if_changed(pipeline.warehouse_spec(warehouse))
        store.materialize_days(days)
    elif stage == "training_set":
        from assets.runner import run_pipeline

        result = run_pipeline(settings=settings, selection=["training_set"], ephemeral=True)
        if not result.success:
            raise RuntimeError("training_set failed")
        out["rows"] = int(warehouse.query("SELECT count(*) AS n FROM training_set")["n"].iloc[0])
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if engine.name == "ray":
        out["worker_peak_rss_mb"] = [round(x) for x in engine.worker_peak_rss_mb()]
        out["workers"] = engine.workers
    return out


def label_digest(warehouse, table: str) -> str:
    """A digest of the labels rounded to 1e-9 (what training reads), order-free and computed inside
    DuckDB: the stage's clock has stopped by then, and no copy of every label enters Python (a pandas
    copy and its CSV were the largest cost of the stage at 20M candidates)."""
    n, total = warehouse.query(
        f"SELECT count(*) AS n, sum(hash(day, request_id, item_id, anchor_id, round(pseudo_label, 9), "
        f"round(pseudo_label_mean_pool, 9), round(confidence, 9))::HUGEINT)::VARCHAR AS s FROM {table}"
    ).iloc[0]
    return hashlib.sha256(f"{n}:{total}".encode()).hexdigest()[:16]


def _cpu_seconds() -> float:
    """user + sys CPU seconds of this process (all its threads) and of its children that were waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stage_main(stage: str, result_path: str) -> None:
    began, cpu_began = time.perf_counter(), _cpu_seconds()
    out = _run_stage(stage)
    out["seconds"] = round(time.perf_counter() - began, 2)
    out["cpu_seconds"] = round(_cpu_seconds() - cpu_began, 2)
    if "digest_table" in out:  # after the clock: checking the labels is not the stage's work
        from gpl_platform.config import load_settings
        from gpl_platform.data.warehouse import Warehouse

        settings = load_settings()
        out["digest"] = label_digest(Warehouse.for_settings(settings), out.pop("digest_table"))
    from gpl_platform.engine.ray_engine import peak_rss_mb

    out["peak_rss_mb"] = round(peak_rss_mb())
    Path(result_path).write_text(json.dumps(out, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage")
    ap.add_argument("--result")
    args = ap.parse_args()
    stage_main(args.stage, args.result)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
