"""Which Dagster instance records a `gpl` command's runs: one instance per data directory.

Two data directories in one instance mix their materializations in the UI (a small world's failed
evaluation shown on top of the demo's assets), so an instance records the data directory it belongs to
(:data:`MARKER`) and refuses runs of another one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: the file in DAGSTER_HOME naming the data directory whose runs the instance records
MARKER = "gpl_data_dir"


class InstanceMismatchError(ValueError):
    """A run of one data directory in the Dagster instance of another."""


def is_default_data_dir(data_dir: Path) -> bool:
    """The project's own ``data/``, whose instance `make ui` shows without GPL_DATA_DIR."""
    from gpl_platform.config import PROJECT_ROOT

    return Path(data_dir).resolve() == (PROJECT_ROOT / "data").resolve()


def default_home(data_dir: Path) -> Path:
    """The instance of a data directory when DAGSTER_HOME is not set: the project's ``.dagster_home`` for
    the default data directory, else ``<data_dir>/.dagster_home``."""
    from gpl_platform.config import PROJECT_ROOT

    if is_default_data_dir(data_dir):
        return PROJECT_ROOT / ".dagster_home"
    return Path(data_dir).resolve() / ".dagster_home"


def prepare(data_dir: Path) -> Path:
    """DAGSTER_HOME for a command on ``data_dir`` (set to :func:`default_home` when unset, with the
    repository's dagster.yaml copied there and refreshed when it changes), claimed for ``data_dir``.

    The instance is the process's (dagster.yaml places its storage under DAGSTER_HOME, and Dagster reads it
    from the environment), so this is called where a process starts: `gpl run` and `gpl evaluate` before
    they create a run, `make ui`'s main (assets/ui.py) before it starts `dagster dev`."""
    from gpl_platform.config import PROJECT_ROOT

    explicit = os.environ.get("DAGSTER_HOME")
    home = Path(explicit) if explicit else default_home(data_dir)
    if not explicit:
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        source, target = PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml"
        if source.exists() and (not target.exists() or target.stat().st_mtime < source.stat().st_mtime):
            shutil.copy2(source, target)
        os.environ["DAGSTER_HOME"] = str(home)
    claim(home, data_dir)
    return home


def claim(home: Path, data_dir: Path) -> None:
    """Record ``data_dir`` as the data directory of the instance at ``home``, or raise
    :class:`InstanceMismatchError` when the instance already records another one."""
    data_dir = Path(data_dir).resolve()
    marker = Path(home) / MARKER
    if marker.exists():
        recorded = marker.read_text().strip()
        if Path(recorded) != data_dir:
            raise InstanceMismatchError(
                f"the Dagster instance {home} records the runs of data directory {recorded}, not {data_dir}: "
                f"unset DAGSTER_HOME (this data directory's runs then go to {default_home(data_dir)}) or point "
                "it at another folder"
            )
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    partial = marker.with_name(MARKER + ".partial")
    partial.write_text(f"{data_dir}\n")
    partial.replace(marker)
