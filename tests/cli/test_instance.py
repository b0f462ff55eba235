"""One Dagster instance per data directory: `gpl run` picks the data directory's instance when DAGSTER_HOME
is unset, names both on stderr, tags every run with them, and refuses a data directory another instance
records (a small world's runs once landed on top of the demo's in `make ui`)."""

import os
import subprocess
import sys
import time

import pytest
from dagster import DagsterInstance

from gpl_platform import config
from gpl_platform.cli import instance
from tests.live import ROOT

SMALL_WORLD = {
    "GPL_SOURCE": "simulator",
    "GPL_SIMULATOR__N_USERS": "30",
    "GPL_SIMULATOR__N_ITEMS": "120",
    "GPL_SIMULATOR__N_DAYS": "3",
}


def test_the_default_instance_follows_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    assert instance.default_home(tmp_path / "data") == tmp_path / ".dagster_home"  # the demo's, for `make ui`
    assert instance.default_home(tmp_path / "small") == tmp_path / "small" / ".dagster_home"


def test_prepare_sets_up_and_claims_the_instance(tmp_path, monkeypatch):
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = instance.prepare(tmp_path / "small")
    assert home == tmp_path / "small" / ".dagster_home" and os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text() and (home / "tmp").is_dir()
    assert (home / instance.MARKER).read_text().strip() == str((tmp_path / "small").resolve())
    # a changed dagster.yaml is copied again
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text() + "\n# changed\n")
    os.utime(tmp_path / "dagster.yaml", (time.time() + 5, time.time() + 5))
    monkeypatch.delenv("DAGSTER_HOME")
    assert instance.prepare(tmp_path / "small") == home
    assert (home / "dagster.yaml").read_text().endswith("# changed\n")
    # an explicit DAGSTER_HOME wins, and is claimed by the data directory that uses it first
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    assert instance.prepare(tmp_path / "other") == tmp_path / "elsewhere"
    with pytest.raises(instance.InstanceMismatchError, match="records the runs of data directory .*other"):
        instance.prepare(tmp_path / "small")


def _gpl_run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpl_platform.cli.main", "run", "--select", "item_catalog", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_run_goes_to_its_data_directorys_instance_and_a_foreign_one_is_refused(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env.update(SMALL_WORLD, PYTHONPATH=str(ROOT), GPL_DATA_DIR=str(tmp_path / "small"))
    done = _gpl_run(env)
    assert done.returncode == 0, done.stderr[-3000:]
    home = tmp_path / "small" / ".dagster_home"
    assert f"data directory {tmp_path / 'small'} (source simulator); Dagster instance {home}" in done.stderr
    assert f"GPL_DATA_DIR={tmp_path / 'small'} make ui" in done.stdout  # the UI of this data directory
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # dagster.yaml places the storage under DAGSTER_HOME
    with DagsterInstance.get() as recorded:
        [run] = recorded.get_runs()
        assert run.tags["gpl/data_dir"] == str(tmp_path / "small") and run.tags["gpl/source"] == "simulator"

    # another data directory, pointed at that instance, is refused before anything runs or is written
    env.update(DAGSTER_HOME=str(home), GPL_DATA_DIR=str(tmp_path / "other"))
    refused = _gpl_run(env)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the Dagster instance {home} records the runs of data directory"), last
    assert "Traceback" not in refused.stderr and not (tmp_path / "other" / "warehouse.duckdb").exists()
    with DagsterInstance.get() as recorded:
        assert len(recorded.get_runs()) == 1
