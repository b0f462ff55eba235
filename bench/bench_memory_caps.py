"""Peak memory of every stage of one `gpl bench scale` world under several DuckDB caps.

`streaming.duckdb_memory_limit` caps every warehouse connection. This re-runs the stages of a world that
`gpl bench scale` left in its work dir (`--work-dir`, one directory per size), each in a fresh process, once per
cap, and writes seconds, peak RSS and the labels' digest per (cap, stage). The stages after ingestion
find their caches warm (item vectors, anchors of both backends, the SID generator), so their seconds are
not those of the scale table; their memory is what the comparison is for, and the digests show the cap
does not change the labels.

    python bench/bench_memory_caps.py --world data/bench_scale/n20000000 --caps 2GB --caps 500MB \
        --out reports/scale/memory_caps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402
import scale_stages  # noqa: E402

# every platform stage but SID training, which the caps do not touch and which would only repeat its fit
STAGES = [s for s in scale_stages.STAGES if s not in ("sid_training", *scale_stages.GENERATOR_STAGES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="a size's directory of the scale work dir")
    ap.add_argument("--candidates", type=int, default=20_000_000, help="the size the world was made for")
    ap.add_argument("--caps", action="append", required=True)
    ap.add_argument("--stage", action="append", dest="stages", help="default: every stage but SID training")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--candidates-per-request", type=int, default=100)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (args.world / "warehouse.duckdb").exists():
        sys.exit(f"{args.world}: no warehouse.duckdb (run gpl bench scale with that work dir first)")
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    for cap in args.caps:
        env = scale_stages.world_env(
            args.candidates,
            args.days,
            args.candidates_per_request,
            args.items,
            args.world,
            # the scale run's settings: another SID epoch count would retrain the generator
            {
                "GPL_STREAMING__DUCKDB_MEMORY_LIMIT": cap,
                "GPL_STREAMING__BATCH_CANDIDATES": 250000,
                "GPL_SID__GENERATOR__EPOCHS": 2,
            },
        )
        logs = args.world / f"logs-cap{cap}"
        logs.mkdir(exist_ok=True)
        for stage in args.stages or STAGES:
            if stage in out.get(cap, {}):  # resumable: a (cap, stage) already measured is kept
                continue
            result = bench_scale.run_stage(stage, env, logs)
            out.setdefault(cap, {})[stage] = result
            print(cap, stage, result["seconds"], "s", result["peak_rss_mb"], "MB", result.get("digest", ""), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
