"""The Dagster code location: `dagster dev -m assets.definitions`, the daemon and the run workers load
``defs``, the asset graph (assets/graph.py) built from the environment's settings (``GPL_*``) when the
module is imported: this import is the code location's process entry point, and the environment its
settings. `gpl run` does not import it: it builds the graph from the settings it was given
(assets/runner.py).
"""

from __future__ import annotations

from assets.graph import CATALOG_JOB, DAILY_JOB, LABELLING_ASSETS, build_definitions

__all__ = ["CATALOG_JOB", "DAILY_JOB", "LABELLING_ASSETS", "build_definitions", "defs"]

defs = build_definitions()
