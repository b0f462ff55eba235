"""`gpl bench scale`: wall time and peak resident memory of every stage as the work grows.

Protocol (docs/SCALING.md): for each size N, a simulator world of about N candidates over ``days`` days
(``candidates_per_request`` per request, one request per user and day on average, so the users grow
with N; a fixed catalog of ``items``; popularity exposure without Monte-Carlo propensities) goes
through every stage, each in a fresh process (its peak RSS is that process's VmHWM): ingestion,
item embeddings, anchors / embeddings / similarities / pseudo-labels with the ``history`` backend
(the main tables) and with the ``sid`` backend (the ``__sid`` tables, after training its semantic
IDs and generator), features, Feast materialization, the training set. The labelling stages run
through :class:`~gpl_platform.pseudo_labels.chain.LabellingChain`, as the Dagster assets do.

The baselines, measured in the same run: each stage's time at the first (smallest) size of the command
(the growth table gives every stage's time as a multiple of it, the plot a linear line through that size's
total; sizes kept by ``--resume`` come from an earlier run), and at ``ray_at`` the local engine's
run of the parallel stages, against which a local Ray cluster of 2 CPUs (started here) runs them with 1
and with 2 workers on a copy of the warehouse (times side by side, labels compared by digest). The
whole-range code (tests/pseudo_labels/reference_labels.py) is no longer a baseline here: benchmarks
import nothing from ``tests/``, and tests/pseudo_labels/test_streaming.py checks the streaming labels
against it. The ``baseline`` entry and the ``*_in_memory`` stages of the 1M run in reports/scale/scale.json
are historical (docs/SCALING.md says how to reproduce them).

The world and the stages themselves are in ``bench/scale_stages.py``; this module runs each stage in its own
process, measures it, and writes the report.

The JSON is rewritten after every stage (``--resume`` skips sizes already done); the log-log plot
of seconds against candidates goes beside it. Numbers on a shared machine: every stage records the
load average before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scale_stages import GENERATOR_STAGES, STAGES, world_env  # noqa: E402

#: the script one stage runs in (``python bench/scale_stages.py --stage <stage> --result <json>``)
STAGE_SCRIPT = Path(__file__).resolve().with_name("scale_stages.py")
RAY_STAGES = ["anchors_sid", "embeddings_history", "similarities_history", "pseudo_labels_history"]


# ---- one stage, started and measured ----------------------------------------------------------


def run_stage(stage: str, env: dict, log_dir: Path, profile: bool = False) -> dict:
    """One stage in a fresh process. ``profile``: under py-spy (sampled Python stacks of every thread,
    in ``<stage>.pyspy.txt`` as collapsed stacks; its own CPU is not in ``cpu_seconds``)."""
    result = log_dir / f"{stage}.json"
    load_before = os.getloadavg()
    began, cpu_began = time.perf_counter(), _children_cpu_seconds()
    command = [sys.executable, str(STAGE_SCRIPT), "--stage", stage, "--result", str(result)]
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        command = [
            py_spy,
            "record",
            "--format",
            "raw",
            "--rate",
            "20",
            "--nonblocking",
            "--threads",
            "-o",
            str(log_dir / f"{stage}.pyspy.txt"),
            "--",
            *command,
        ]
    with open(log_dir / f"{stage}.log", "w") as log:
        proc = subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {log_dir / (stage + '.log')}")
    out = json.loads(result.read_text())
    out["process_seconds"] = round(time.perf_counter() - began, 2)
    # the whole stage process (imports included): what the kernel charged it and its children, all threads
    out["process_cpu_seconds"] = round(_children_cpu_seconds() - cpu_began, 2)
    out["load_before"], out["load_after"] = [round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]
    print(
        f"  {stage}: {out['cpu_seconds']} CPU s, {out['seconds']} wall s, peak {out['peak_rss_mb']} MB, "
        f"load {out['load_before'][0]}",
        flush=True,
    )
    return out


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- the benchmark --------------------------------------------------------------------------------


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(report))


def platform_seconds(run: dict) -> float:
    """Seconds of the platform's stages of one size: not the generator (nor the whole-range stages an older
    report, kept by ``--resume``, may hold)."""
    return sum(x["seconds"] for k, x in run["stages"].items() if k in STAGES and k not in GENERATOR_STAGES)


def markdown(report: dict) -> str:
    """The tables of docs/SCALING.md: seconds / peak RSS per stage and size, load average at the stage's start."""
    runs = [r for r in report["runs"] if "candidates" in r]
    if not runs:
        return ""
    head = "| stage | " + " | ".join(f"{r['candidates']:,} candidates" for r in runs) + " |"
    lines = [head, "|" + " --- |" * (len(runs) + 1)]
    names = [s for s in STAGES if any(s in r["stages"] for r in runs)]
    for stage in names:
        cells = []
        for r in runs:
            x = r["stages"].get(stage)
            cells.append(
                f"{x['seconds']:.1f} s, {x['peak_rss_mb']:,} MB (load {x['load_before'][0]:.1f})" if x else "-"
            )
        label = f"{stage} (the benchmark's generator)" if stage in GENERATOR_STAGES else stage
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    totals = [platform_seconds(r) for r in runs]
    lines.append("| **all platform stages** | " + " | ".join(f"**{t:.0f} s**" for t in totals) + " |")
    if len(runs) > 1:
        lines += [
            "",
            "| stage | "
            + " | ".join(f"{r['candidates'] / runs[0]['candidates']:.1f}x the work" for r in runs[1:])
            + " |",
            "|" + " --- |" * len(runs),
        ]
        for stage in STAGES:
            base = runs[0]["stages"].get(stage)
            cells = [
                f"{r['stages'][stage]['seconds'] / base['seconds']:.1f}x time" if base and stage in r["stages"] else "-"
                for r in runs[1:]
            ]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    ray = report.get("ray") or {}
    if ray.get("stages"):
        lines += [
            "",
            "| stage (Ray, 2-CPU local cluster) | 1 worker | 2 workers | speed-up | local engine |",
            "| --- | --- | --- | --- | --- |",
        ]
        for stage in RAY_STAGES:
            one, two = ray["stages"][f"{stage}_ray1"], ray["stages"][f"{stage}_ray2"]
            lines.append(
                f"| {stage} | {one['seconds']:.1f} s (load {one['load_before'][0]:.1f}) | {two['seconds']:.1f} s "
                f"(load {two['load_before'][0]:.1f}) | {one['seconds'] / two['seconds']:.2f}x | "
                f"{ray['local_engine_seconds'][stage]:.1f} s |"
            )
        lines.append(f"| **together** | | | **{ray['speedup_2_vs_1']:.2f}x** | |")
    return "\n".join(lines) + "\n"


def run(
    sizes: list[int],
    out: Path,
    *,
    days: int = 7,
    per_request: int = 100,
    items: int = 2000,
    ray_at: int | None = 1_000_000,
    work_dir: Path | None = None,
    batch_candidates: int = 250_000,
    sid_epochs: int = 2,
    resume: bool = False,
    keep: bool = False,
    skip: Sequence[str] = (),
    profile: bool = False,
) -> dict:
    """Every stage at each of ``sizes``, the Ray comparison at ``ray_at``."""
    report = json.loads(out.read_text()) if resume and out.exists() else {"runs": [], "ray": {}}
    report["protocol"] = {
        "days": days,
        "candidates_per_request": per_request,
        "items": items,
        "batch_candidates": batch_candidates,
        "sid_generator_epochs": sid_epochs,
        "cpu_count": os.cpu_count(),
        "stages": STAGES,
    }
    work_dir = Path(work_dir or ROOT / "data" / "bench_scale")
    extra = {"GPL_STREAMING__BATCH_CANDIDATES": batch_candidates, "GPL_SID__GENERATOR__EPOCHS": sid_epochs}
    done = {r["candidates_target"] for r in report["runs"]}
    for size in sizes:
        if size in done:
            continue
        data_dir = work_dir / f"n{size}"
        shutil.rmtree(data_dir, ignore_errors=True)
        env = world_env(size, days, per_request, items, data_dir, extra)
        logs = data_dir / "logs"
        logs.mkdir(parents=True)
        print(f"{size:,} candidates ({env['GPL_SIMULATOR__N_USERS']} users x {days} days)", flush=True)
        entry = {"candidates_target": size, "users": int(env["GPL_SIMULATOR__N_USERS"]), "stages": {}}
        report["runs"].append(entry)
        order = [s for s in STAGES if s not in skip]
        entry["skipped"] = [s for s in STAGES if s in skip]
        for stage in order:
            entry["stages"][stage] = run_stage(stage, env, logs, profile)
            if stage == "ingestion":
                entry["candidates"] = entry["stages"][stage]["candidates"]
            _write(report, out)
        if size == ray_at:
            report["ray"] = ray_comparison(entry, data_dir, env, logs)
        _write(report, out)
        if not keep:
            shutil.rmtree(data_dir / "feast", ignore_errors=True)
    return report


def ray_comparison(entry: dict, data_dir: Path, env: dict, logs: Path) -> dict:
    """The parallel stages on a local 2-CPU Ray cluster with 1 and 2 workers, each on a fresh copy of the
    warehouse after the local run (the sid anchor cache emptied, so that anchors are generated)."""
    import duckdb

    from gpl_platform.engine.ray_engine import LocalRayCluster

    local = entry["stages"]
    result: dict = {"stages": {}}
    with LocalRayCluster(num_cpus=2) as cluster:
        for workers in (1, 2):
            copy = data_dir.parent / f"{data_dir.name}-ray{workers}"
            shutil.rmtree(copy, ignore_errors=True)
            copy.mkdir()
            shutil.copy2(data_dir / "warehouse.duckdb", copy / "warehouse.duckdb")
            shutil.copytree(data_dir / "artifacts", copy / "artifacts")
            with duckdb.connect(str(copy / "warehouse.duckdb")) as con:
                con.execute("DELETE FROM anchor_cache WHERE backend = 'sid'")
            ray_env = {
                **env,
                **cluster.env(),
                "GPL_DATA_DIR": str(copy),
                "GPL_ENGINE": "ray",
                "GPL_RAY__ADDRESS": cluster.address,
                "GPL_RAY__WORKERS": str(workers),
                "GPL_STREAMING__ENCODE_BATCH_TEXTS": "512",
            }
            for stage in RAY_STAGES:
                result["stages"][f"{stage}_ray{workers}"] = run_stage(stage, ray_env, logs)
            shutil.rmtree(copy, ignore_errors=True)
    stages = result["stages"]
    result["identical_labels"] = (
        stages["pseudo_labels_history_ray2"]["digest"] == local["pseudo_labels_history"]["digest"]
    )
    total = {w: sum(stages[f"{s}_ray{w}"]["seconds"] for s in RAY_STAGES) for w in (1, 2)}
    result["speedup_2_vs_1"] = round(total[1] / total[2], 3)
    result["speedup_by_stage"] = {
        s: round(stages[f"{s}_ray1"]["seconds"] / stages[f"{s}_ray2"]["seconds"], 3) for s in RAY_STAGES
    }
    n = entry["candidates"]
    result["candidates_per_s_per_worker"] = {
        s: {w: round(n / stages[f"{s}_ray{w}"]["seconds"] / w) for w in (1, 2)}
        for s in ("similarities_history", "pseudo_labels_history")
    }
    result["local_engine_seconds"] = {s: local[s]["seconds"] for s in RAY_STAGES}
    result["note"] = (
        "Ray encodes anchor texts in chunks of 512 (the local column: one chunk of up to 8,192); both "
        "generate the sid anchors without a cache"
    )
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "candidates" in r]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20").colors  # one color per stage (the default cycle repeats after ten)
    for i, stage in enumerate(STAGES):
        points = [(r["candidates"], r["stages"][stage]["seconds"]) for r in runs if stage in r["stages"]]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="os^D"[i % 4], color=colors[i % len(colors)], label=stage)
    if len(runs) > 1:  # the linear reference through the smallest size's total
        x0 = runs[0]["candidates"]
        t0 = platform_seconds(runs[0])
        xs = [r["candidates"] for r in runs]
        ax.plot(xs, [t0 * x / x0 for x in xs], "k--", lw=1, label="linear (sum of the platform stages)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates")
    ax.set_ylabel("seconds (wall, shared 2-core machine)")
    ax.set_title("gpl bench scale: time per stage")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
