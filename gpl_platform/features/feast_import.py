"""Importing Feast without its side effect on warnings.

``feast`` (feature_store.py, feature_view.py, on_demand_feature_view.py) calls
``warnings.simplefilter("once", DeprecationWarning)`` when it is imported: from then on every library's
internal deprecation warnings print once per process, where Python shows them only for ``__main__``.
The demo's log then carried a Dagster-internal warning no user can act on. :func:`import_feast` imports
Feast first and then puts Python's default back (unless the user chose filters with ``-W`` or
``PYTHONWARNINGS``), plus the filters for Feast's own noise.
"""

from __future__ import annotations

import sys
import warnings


def import_feast() -> None:
    """Import Feast (seconds on the first call: it imports torch), then restore the warning filters."""
    import feast  # noqa: F401  (imported for its side effects on the filters, undone below)

    if not sys.warnoptions:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.filterwarnings("ignore", message=".*On demand feature view is an experimental feature.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(feast|ibis)\..*")
