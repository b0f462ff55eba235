"""Feast's import turns on every library's deprecation warnings; import_feast puts Python's default back."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import types, sys
    {imports}
    library = types.ModuleType("some_library")  # a deprecation raised inside another library, as Dagster's are
    exec("import warnings\\ndef call():\\n    warnings.warn('old api', DeprecationWarning)", library.__dict__)
    library.call()
    """
)


def _stderr(imports: str) -> str:
    code = SCRIPT.format(imports=imports)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_library_deprecation_stays_quiet_after_feast_is_imported():
    assert "old api" in _stderr("import feast"), "feast's own import no longer shows it: the helper may be moot"
    assert _stderr("from gpl_platform.features.feast_import import import_feast; import_feast()") == ""


def test_a_users_warning_options_are_kept():
    code = SCRIPT.format(imports="from gpl_platform.features.feast_import import import_feast; import_feast()")
    done = subprocess.run(
        [sys.executable, "-W", "default::DeprecationWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert "old api" in done.stderr
