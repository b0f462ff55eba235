"""How long the code location takes to load for a contract source, at two data sizes, against the
baseline of reading the data (what the definitions did before: the partitions came from the rows).

    python bench/bench_code_location.py --out reports/code_location.json

For each size and layout (one flat events.parquet; events/day=YYYY-MM-DD/ folders) it writes a
simulator world as a contract directory, then times, in fresh processes, ``import assets.definitions``
(the code location) and, as the baseline, ``read_contract_dir`` of the same directory (the rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._timing import write_json  # noqa: E402

# about 56 thousand and 3 million events
SIZES = {
    "small": {"n_users": 200, "n_items": 500, "n_days": 14},
    "large": {"n_users": 5000, "n_items": 5000, "n_days": 30},
}
LOAD = "import assets.definitions as d; assert d.defs.resolve_job_def('gpl_daily').partitions_def"
READ = "import sys; from gpl_platform.data.delivery import read_contract_dir; read_contract_dir(sys.argv[1])"


def _write_world(directory: Path, size: dict, by_day: bool) -> int:
    from gpl_platform.config import load_settings
    from gpl_platform.data.delivery import write_event_day
    from gpl_platform.data.sources import load_source

    settings = load_settings({"source": "simulator", "simulator": {**size, "exposure": {"propensity_samples": 0}}})
    dataset = load_source(settings)
    directory.mkdir(parents=True)
    dataset.items.to_parquet(directory / "items.parquet", index=False)
    dataset.users.to_parquet(directory / "users.parquet", index=False)
    events = dataset.events
    if by_day:
        for day, part in events.groupby("day"):
            write_event_day(directory, day, part.drop(columns=["day"]))
    else:
        events.drop(columns=["day"]).to_parquet(directory / "events.parquet", index=False)
    return len(events)


def _time(code: str, env: dict, args: list[str], repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, cwd=ROOT)
        seconds.append(time.perf_counter() - began)
    return {"median_s": round(statistics.median(seconds), 2), "runs_s": [round(s, 2) for s in seconds]}


def run(repeats: int = 3) -> dict:
    result: dict = {"repeats": repeats, "load_average": os.getloadavg(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SIZES.items():
            for layout in ("flat", "day_folders"):
                directory = Path(tmp) / f"{name}_{layout}"
                rows = _write_world(directory, size, layout == "day_folders")
                env = {
                    **os.environ,
                    "GPL_SOURCE": "contract",
                    "GPL_CONTRACT__PATH": str(directory),
                    "PYTHONPATH": str(ROOT),
                    "GPL_DATA_DIR": str(Path(tmp) / "data"),
                }
                result["cases"][f"{name}/{layout}"] = {
                    "events": rows,
                    "code_location_load": _time(LOAD, env, [], repeats),
                    "baseline_read_rows": _time(READ, env, [str(directory)], repeats),
                }
                print(name, layout, result["cases"][f"{name}/{layout}"], flush=True)
    result["load_average_after"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    write_json(run(args.repeats), args.out)


if __name__ == "__main__":
    main()
