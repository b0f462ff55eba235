"""How the `gpl` command reaches the orchestration layer without importing it.

`gpl run`, `gpl evaluate` and `gpl bench pseudo-labels` drive the Dagster asset graph, which lives above
the library (`assets/`). The library names no module of it: the orchestration declares its runner as the
entry point ``runner`` of the group :data:`GROUP` (pyproject.toml, ``[project.entry-points]``), and
:func:`runner` loads it when one of those commands runs. The commands pass it their settings as a value
and read back what the run wrote; :class:`Runner` is all they use of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from gpl_platform.config import Settings

GROUP = "gpl_platform.orchestration"


class PipelineResult(Protocol):
    success: bool
    runs: list[str]
    seconds: dict[str, float]
    partition_range: tuple[str, str] | None
    failed_checks: list[str]
    refused_days: list[tuple[str, str]]
    #: asset key -> the JSON report its materialization wrote (e.g. ``offline_evaluation``)
    reports: dict[str, Path]


class Runner(Protocol):
    #: the assets from delivered events to pseudo-labels, in order
    LABELLING_ASSETS: Sequence[str]

    def run_pipeline(
        self,
        start: str | None = None,
        end: str | None = None,
        *,
        selection: list[str] | None = None,
        debug: bool = False,
        settings: Settings | None = None,
    ) -> PipelineResult: ...


class OrchestrationNotInstalled(RuntimeError):
    """The project is installed without its orchestration entry point (an install older than it)."""


def runner() -> Runner:
    """The orchestration's runner (``assets.runner``), found through its entry point."""
    found = entry_points(group=GROUP, name="runner")
    if not found:
        raise OrchestrationNotInstalled(
            f"no entry point 'runner' in the group {GROUP}: the installed project predates it; reinstall it "
            "(`make setup`, or `pip install --no-deps -e .`)"
        )
    return next(iter(found)).load()
