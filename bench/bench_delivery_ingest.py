"""What refusing a bad delivery whole costs: ingesting a day-folder delivery with every day validated before any
is written (``ingest_delivered_days``, what ``candidate_events`` does) against the single read of each day it
replaced (``ingest_event_day_chunks`` day after day, which could leave earlier days of a refused range written).

Each mode runs in its own process on the same exported simulator world (peak RSS is per process), twice,
alternating. JSON out::

    python bench/bench_delivery_ingest.py --candidates 7500000 --out data/reports/delivery_ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("single_read", "validate_first")


def _world(work: Path, candidates: int, days: int, per_request: int) -> Path:
    delivery = work / "delivery"
    if (delivery / "events").exists():
        return delivery
    from gpl_platform.config import load_settings
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir

    settings = load_settings(
        {
            "source": "simulator",
            "data_dir": str(work / "sim"),
            "simulator": {
                "n_users": max(10, candidates // (per_request * days)),
                "n_items": 2000,
                "n_days": days,
                "candidates_per_request": per_request,
                "requests_per_user_per_day": 1.0,
                "exposure": {"propensity_samples": 0},
            },
        }
    )
    export_contract_dir(load_source(settings), delivery, by_day=True)
    return delivery


def _ingest(work: Path, mode: str) -> dict:
    from gpl_platform.config import load_settings
    from gpl_platform.data import ingestion
    from gpl_platform.data.delivery_chunks import delivered_item_ids
    from gpl_platform.data.sources import delivered_day_events, load_source
    from gpl_platform.data.warehouse import Warehouse

    delivery = work / "delivery"
    settings = load_settings(
        {"source": "contract", "contract": {"path": str(delivery), "start_date": "2024-01-01"}, "data_dir": str(work)}
    )
    path = work / f"{mode}.duckdb"
    path.unlink(missing_ok=True)
    warehouse = Warehouse(path, 60, settings.streaming.duckdb_memory_limit)
    days = sorted(date.fromisoformat(p.name[4:]) for p in (delivery / "events").iterdir())
    signature = settings.source_signature()
    began = time.perf_counter()
    delivered = delivered_item_ids(delivery, settings.streaming.duckdb_memory_limit)
    ingestion.ingest_catalog(warehouse, load_source(settings, days=[]), signature, delivered)
    if mode == "single_read":
        for day, chunks in delivered_day_events(settings, days):
            ingestion.ingest_event_day_chunks(warehouse, day, chunks, signature)
    else:
        ingestion.ingest_delivered_days(warehouse, lambda: delivered_day_events(settings, days), signature)
    events = int(warehouse.query("SELECT count(*) AS n FROM events")["n"].iloc[0])
    return {
        "mode": mode,
        "events": events,
        "days": len(days),
        "seconds": round(time.perf_counter() - began, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "duckdb_memory_limit": settings.streaming.duckdb_memory_limit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--per-request", type=int, default=100)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench_delivery_ingest")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_ingest(args.work_dir, args.mode)))
        return
    _world(args.work_dir, args.candidates, args.days, args.per_request)
    runs = []
    for mode in MODES * 2:
        child = [sys.executable, __file__, "--work-dir", str(args.work_dir), "--mode", mode]
        done = subprocess.run(child, capture_output=True, text=True, check=True, env=os.environ)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {"runs": runs, "load_average": os.getloadavg()}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        result[mode] = {k: min(r[k] for r in mine) for k in ("seconds", "peak_rss_mb")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({m: result[m] for m in MODES}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
