"""`gpl run`: the asset graph over a range of days, in process, recorded in the Dagster instance.

The orchestration the `gpl` command drives (`gpl run`, `gpl evaluate`, `gpl bench pseudo-labels`): the
library's CLI does not import this module, it loads it through the entry point ``runner`` of the group
``gpl_platform.orchestration`` (pyproject.toml; gpl_platform/cli/orchestration.py), and passes the
settings as a value (``run_pipeline(settings=...)``). What a run wrote comes back in the result
(``PipelineResult.reports``), not from the files' times.

Public Dagster APIs only (what ``dagster.materialize`` does: a job ``gpl_run`` over each stage's
selection, ``execute_in_process`` against ``DagsterInstance.get()``, with Dagster's documented
partition-range run tags, and a console logger that prints each event on one line; ``--debug``: every
event in full). The runs obey the same one-writer rule as the daemon's: every asset is in
the ``duckdb_warehouse`` concurrency pool (dagster.yaml: one slot, op granularity), so a step waits
while a queued or scheduled run writes, and the other way round. Before starting, runs whose process
died are marked failed (assets/run_health.py) so their slots are free. On Ctrl-C or SIGTERM, every run
it created that had not finished is marked failed (Dagster does that only for a run it already executes,
not for one it created and was still planning), and :class:`Interrupted` names them.

Stages: the unpartitioned roots (catalog, item vectors, semantic IDs, Feast registry), then every
partitioned asset once over the whole range of days (one run, one process, as a single-run backfill
would), then what consumes the days (training, evaluation, label audit).
"""

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetSelection, DagsterInstance, Definitions, Field, InitLoggerContext, define_asset_job, logger

from assets.graph import LABELLING_ASSETS as LABELLING_ASSETS  # what `gpl bench pseudo-labels` selects
from assets.graph import build_definitions
from assets.partitions import range_tags
from assets.resources import GplSettings, gpl_resources
from assets.run_health import HOST_TAG, PID_TAG, fail_dead_runs, fail_unfinished_runs
from gpl_platform.config import Settings
from gpl_platform.data.sources import contract_last_day

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
DATA_DIR_TAG, SOURCE_TAG = "gpl/data_dir", "gpl/source"
RUN_TAGS = {"gpl/launched_by": "gpl run", HOST_TAG: socket.gethostname()}
RUN_JOB = "gpl_run"
#: the modules of the platform's own errors: their messages say what to do, a library's cause does not
OWN_MODULES = ("gpl_platform.", "assets.")
INTERRUPTS = {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}
INTERRUPTED = "gpl run was interrupted (Ctrl-C or SIGTERM) before this run finished: marked failed by gpl run"


class _FirstLine(logging.Formatter):
    """A Dagster event as one line: its first line (a step failure's traceback stays in the run's log in
    the instance, and `gpl run --debug` prints it), without the job name, run id and pid."""

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines()
        parts = (lines[0] if lines else "").split(" - ")
        if parts[0] == RUN_JOB and len(parts) > 2:  # "gpl_run - <run id> - [<pid> -] [<step> -] ..."
            parts = parts[2:]
            parts = parts[1:] if parts[0].isdigit() and len(parts) > 1 else parts
        return f"{self.formatTime(record)} {record.levelname} dagster: {' - '.join(parts)}"


def _not_a_skip(record: logging.LogRecord) -> bool:
    """Steps not executed after a failure: the failure and the runner's summary say it already."""
    return "Not executing." not in record.getMessage()


@logger(
    config_schema={"log_level": Field(str, is_required=False, default_value="INFO")},
    description="Dagster's events on stderr, one line each (gpl run without --debug).",
)
def one_line_console(init_context: InitLoggerContext) -> logging.Logger:
    out = logging.Logger("gpl.dagster", level=init_context.logger_config["log_level"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FirstLine())
    handler.addFilter(_not_a_skip)
    out.addHandler(handler)
    return out


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the pipeline; ``runs``: the runs it created that had not finished, all
    marked failed now (by Dagster, or by the runner when Dagster had not started them)."""

    def __init__(self, runs: list[str]):
        super().__init__(", ".join(runs))
        self.runs = runs


class PipelineError(RuntimeError):
    """A stage failed for another reason than a quality check: ``str()`` is one line, ``details`` the
    full error with its traceback."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details or message


@dataclass
class PipelineResult:
    success: bool
    runs: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    partition_range: tuple[str, str] | None = None
    failed_checks: list[str] = field(default_factory=list)
    #: (check, day) of every failed per-day evaluation of a blocking check
    refused_days: list[tuple[str, str]] = field(default_factory=list)
    #: asset key -> the JSON report its materialization wrote (its ``report_json`` metadata), e.g.
    #: ``offline_evaluation`` -> <data_dir>/reports/offline_eval.json (logged_eval.json without oracle labels)
    reports: dict[str, Path] = field(default_factory=dict)


def default_range(defs_settings: Settings, keys: list[str]) -> tuple[str, str]:
    """The whole partition set, ending on a contract's last delivered day when that is known cheaply."""
    end = keys[-1]
    if defs_settings.source == "contract":
        last = contract_last_day(defs_settings)
        if last is not None and last.isoformat() in keys:
            end = last.isoformat()
    return keys[0], end


def _chain(error) -> list:
    """A Dagster error and its causes, outermost first."""
    chain = [error]
    while getattr(chain[-1], "cause", None) is not None:
        chain.append(chain[-1].cause)
    return chain


def _own(error) -> bool:
    # the message starts with the exception's qualified name ("gpl_platform.data.warehouse.WarehouseLockedError: ...")
    return (error.message or "").lstrip().startswith(OWN_MODULES)


def _error_line(error) -> str:
    """A Dagster step error as ``ClassName: message`` on one line: the outermost of the platform's own errors
    in its causes (e.g. WarehouseLockedError, whose message says what to do, not the DuckDB IOException
    under it), else the innermost cause (Dagster wraps the user's error)."""
    chain = _chain(error)
    error = next((e for e in chain if _own(e)), chain[-1])
    text = (error.message or "").strip().splitlines()
    line = text[0] if text else error.cls_name
    head, sep, rest = line.partition(": ")
    return f"{head.rsplit('.', 1)[-1]}: {rest}" if sep and " " not in head else line


def _interrupted(run) -> bool:
    """Dagster caught a Ctrl-C or SIGTERM itself (in a step, or between steps) and failed the run."""
    errors = [e.step_failure_data.error for e in run.get_step_failure_events()]
    errors += [e.job_failure_data.error for e in run.all_events if e.is_run_failure]
    return any(link.cls_name in INTERRUPTS for error in errors if error is not None for link in _chain(error))


@contextmanager
def _uninterruptible():
    """A second Ctrl-C must not stop the cleanup of the first halfway (it takes a moment)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _materialize(
    everything: list, selected, resources: dict, instance: DagsterInstance, tags: dict, debug: bool, run_id: str
):
    """What ``dagster.materialize`` does (a job over the selection, executed in process), with the
    one-line console logger unless ``debug`` (Dagster's own console, every event in full). The run id is
    chosen here, so the run is known even when an interrupt lands while Dagster creates it."""
    # A job's loggers apply only when the run config configures them; without, Dagster logs every event at DEBUG.
    loggers = {} if debug else {"console": one_line_console}
    defs = Definitions(
        jobs=[define_asset_job(RUN_JOB, selection=selected)], assets=everything, resources=resources, loggers=loggers
    )
    run_config = None if debug else {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    return defs.resolve_job_def(RUN_JOB).execute_in_process(
        run_config=run_config, instance=instance, tags=tags, raise_on_error=False, run_id=run_id
    )


def run_pipeline(
    start: str | None = None,
    end: str | None = None,
    resources: dict | None = None,
    selection: list[str] | None = None,
    ephemeral: bool = False,
    defs: Definitions | None = None,
    debug: bool = False,
    settings: Settings | None = None,
) -> PipelineResult:
    """Materialize the asset graph (optionally a key selection) over partitions [start, end] with
    ``settings`` (or the ``gpl`` resource of ``resources``; neither: the environment's). Dagster's events go
    to stderr one line each (``debug``: in full, from DEBUG up)."""
    gpl = (resources or {}).get("gpl")
    if gpl is not None and settings is not None:
        raise ValueError("pass the settings or a gpl resource, not both")
    gpl = gpl or (GplSettings.from_settings(settings) if settings is not None else GplSettings())
    settings = settings or gpl.settings()
    defs = defs or build_definitions(settings, gpl)
    resources = {**gpl_resources(gpl), **(resources or {})}
    assets = list(defs.assets)
    partitions = next(a.partitions_def for a in assets if a.partitions_def is not None)
    keys = list(partitions.get_partition_keys())
    if not keys:
        raise ValueError("the partition set is empty (a contract start date in the future?)")
    first, last = default_range(settings, keys)
    start, end = start or first, end or last
    for name, key in (("--start", start), ("--end", end)):
        if key not in keys:
            raise ValueError(f"{name} {key} is not a partition: the partitions are {keys[0]} .. {keys[-1]} (UTC days)")
    if keys.index(start) > keys.index(end):
        raise ValueError(f"--start {start} is after --end {end}")
    instance = DagsterInstance.ephemeral() if ephemeral else DagsterInstance.get()
    if not ephemeral:
        for run_id in fail_dead_runs(instance):
            log.warning("run %s had lost its process: marked failed, its pool slot freed", run_id)
    result = PipelineResult(success=True, partition_range=(start, end))
    everything = [*assets, *defs.asset_checks]
    wanted = AssetSelection.all() if selection is None else AssetSelection.assets(*selection)
    partitioned = AssetSelection.assets(*[a for a in assets if a.partitions_def is not None])
    chosen = wanted.resolve(assets)
    stage_keys = {
        "unpartitioned": (AssetSelection.all() - partitioned.downstream()).resolve(assets),
        "partitioned": partitioned.resolve(assets),
        "final": (partitioned.downstream() - partitioned).resolve(assets),
    }
    # the data directory and source on every run: the UI shows which delivery a run belongs to
    tags = {**RUN_TAGS, PID_TAG: str(os.getpid()), DATA_DIR_TAG: str(settings.data_dir), SOURCE_TAG: settings.source}
    created: list[str] = []  # the runs of this call, failed on an interrupt if they had not finished
    try:
        for name, keys_in_stage in stage_keys.items():
            selected = chosen & keys_in_stage
            if not selected:
                continue
            began = time.perf_counter()
            created.append(str(uuid.uuid4()))
            # The checks go along: Dagster runs those of the selected assets, and blocking ones stop downstream
            # steps of the same run. A later stage goes on after a failed *check* (its consumers re-check every
            # day and leave failing days out, e.g. training_set); any other failure stops the pipeline.
            run = _materialize(
                everything,
                AssetSelection.assets(*selected),
                resources,
                instance,
                {**tags, **(range_tags(start, end) if name == "partitioned" else {})},
                debug,
                created[-1],
            )
            result.seconds[name] = round(time.perf_counter() - began, 2)
            result.runs.append(run.run_id)
            log.info("%s stage: run %s in %.1fs", name, run.run_id, result.seconds[name])
            if _interrupted(run):
                raise Interrupted([run.run_id])
            _collect_failed_checks(run, result)
            result.reports.update(_reports(run))
            if run.success:
                continue
            errors = [event.step_failure_data.error for event in run.get_step_failure_events()]
            if errors and all(error.cls_name == "DagsterAssetCheckFailedError" for error in errors):
                log.warning(
                    "%s stage: blocking quality checks failed (the run is marked failed; consumers skip the "
                    "failing days)",
                    name,
                )
                continue
            result.success = False
            lines = "; ".join(dict.fromkeys(_error_line(e) for e in errors)) or "the run failed (see its logs)"
            raise PipelineError(
                f"{name} stage failed (run {run.run_id}): {lines}", "\n\n".join(e.to_string() for e in errors)
            )
    except KeyboardInterrupt as exc:
        # Dagster fails a run it executes when interrupted; one it created but had not started (the interrupt
        # landed while it planned or created the run) would stay NOT_STARTED, and hold the queue.
        with _uninterruptible():
            stopped = fail_unfinished_runs(instance, created, INTERRUPTED)
        raise Interrupted([*getattr(exc, "runs", []), *stopped]) from exc
    return result


def _reports(run) -> dict[str, Path]:
    """The JSON reports the run's materializations wrote, by asset key (their ``report_json`` metadata)."""
    found = {}
    for event in run.get_asset_materialization_events():
        materialization = event.materialization
        if "report_json" in materialization.metadata:
            found[materialization.asset_key.to_user_string()] = Path(materialization.metadata["report_json"].value)
    return found


def _collect_failed_checks(run, result: PipelineResult) -> None:
    failed: dict[str, list[str]] = {}
    for evaluation in run.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        name = f"{evaluation.asset_key.to_user_string()}.{evaluation.check_name}"
        failed.setdefault(name, []).append(evaluation.partition or "")
        if evaluation.blocking and evaluation.partition:
            result.refused_days.append((name, evaluation.partition))
    for name, days in failed.items():
        where = f" on {len(days)} day(s): {', '.join(d for d in days[:8] if d)}" + (" ..." if len(days) > 8 else "")
        result.failed_checks.append(name + (where if any(days) else ""))
