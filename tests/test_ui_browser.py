"""End to end through the Dagster UI in headless Chromium.

A temp Dagster instance (DAGSTER_HOME) gets a GPL materialization of all days and a failing
blocking check (one day's labels saturated on purpose); then the webserver starts on a free
127.0.0.1 port in its own process group, Playwright drives Debian's /usr/bin/chromium to the
asset graph and to the checks of `pseudo_labels`, asserts what is shown, saves screenshots under
the test's temp dir, and the process group is stopped with SIGTERM.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import date
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
HISTORY = json.dumps({"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}})
PIPELINE = ["candidate_events", "user_histories", "user_anchors", "anchor_embeddings", "candidate_similarities",
            "similarity_calibration", "pseudo_labels"]
GPL_ASSETS = ["user_anchors", "anchor_embeddings", "item_embeddings", "pseudo_labels"]  # full names on the graph
BAD_DAY = "2024-01-05"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The code location the webserver loads: the project's definitions plus the quality objects
# (used as is once assets/definitions.py wires them in itself).
UI_DEFS = textwrap.dedent("""
    from dagster import Definitions
    from assets import definitions as d

    if d.defs.resolve_asset_graph().asset_check_keys:
        defs = d.defs
    else:
        from assets.audit import audit_assets
        from assets.checks import all_checks
        from assets.schedules import build_schedules

        defs = Definitions(assets=[*d.all_assets, *audit_assets], asset_checks=all_checks, jobs=[d.daily_job],
                           schedules=build_schedules(d.daily_job), resources={"gpl": d.GplSettings()},
                           executor=d.in_process_executor)
""")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _materialize_into(home: Path, data: Path, monkeypatch) -> None:
    """The GPL graph for all days, then a saturated BAD_DAY and its (failing) label checks."""
    from dagster import AssetSelection, DagsterInstance, materialize
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from assets.audit import audit_assets
    from assets.checks import all_checks
    from assets.definitions import all_assets
    from assets.resources import GplSettings

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    everything = [*all_assets, *audit_assets, *all_checks]
    gpl = GplSettings(data_dir=str(data), overrides_json=HISTORY)
    with DagsterInstance.get() as instance:
        assert materialize(everything, selection=["item_catalog", "users", "item_embeddings"],
                           resources={"gpl": gpl}, instance=instance).success
        assert materialize(everything, selection=AssetSelection.assets(*PIPELINE), resources={"gpl": gpl},
                           instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: "2024-01-01",
                                                    ASSET_PARTITION_RANGE_END_TAG: BAD_DAY}).success
        assert materialize(everything, selection=["label_audit"], resources={"gpl": gpl}, instance=instance).success
        with gpl.warehouse().transaction() as con:
            con.execute("UPDATE pseudo_labels SET pseudo_label = 1.0, confidence = 1.0 WHERE day = ?",
                        [date.fromisoformat(BAD_DAY)])
        bad = materialize(everything, selection=AssetSelection.checks_for_assets("pseudo_labels"),
                          resources={"gpl": gpl}, instance=instance, raise_on_error=False,
                          tags={ASSET_PARTITION_RANGE_START_TAG: BAD_DAY, ASSET_PARTITION_RANGE_END_TAG: BAD_DAY})
        assert not bad.success
        evaluation = {e.check_name: e for e in bad.get_asset_check_evaluations()}
        assert not evaluation["pseudo_labels_distribution"].passed and evaluation["pseudo_labels_valid"].passed


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"webserver exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"webserver did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _dismiss_welcome(page) -> None:
    """The UI's first-visit "Join the Dagster community" dialog covers the page: skip it."""
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.first.click()
        page.wait_for_timeout(300)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # children (the code server) of the group, if any survived their parent
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_asset_graph_and_failing_check_in_the_ui(tmp_path, monkeypatch):
    home, data, shots = tmp_path / "dagster_home", tmp_path / "data", tmp_path / "screenshots"
    for folder in (home / "tmp", data, shots):
        folder.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    (tmp_path / "ui_defs.py").write_text(UI_DEFS)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ.copy()
    env.update({"DAGSTER_HOME": str(home), "GPL_DATA_DIR": str(data), "TMPDIR": str(home / "tmp"),
                "PYTHONPATH": str(ROOT), "DAGSTER_DISABLE_TELEMETRY": "1"})
    log = tmp_path / "webserver.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1",
                                   "-p", str(port), "-f", str(tmp_path / "ui_defs.py"), "-d", str(ROOT)],
                                  env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        began = time.monotonic()
        # The server starts while this process materializes into the same instance (it reads the
        # instance's storage on every request).
        _materialize_into(home, data, monkeypatch)
        materialized = time.monotonic()
        _wait_for_server(url, server, log)
        print(f"materialized in {materialized - began:.1f}s, server up after {time.monotonic() - began:.1f}s")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            # Playwright gives every launch a fresh, empty profile directory (--user-data-dir).
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                # The asset graph (lineage) of the `gpl` group: every GPL asset is a node.
                page.goto(f"{url}/locations/ui_defs.py/asset-groups/gpl/lineage", wait_until="domcontentloaded")
                for name in GPL_ASSETS:
                    page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
                for part in ("_similarities", "_calibration"):  # long names are shortened on the nodes
                    page.get_by_text(part).first.wait_for(timeout=10_000)
                _dismiss_welcome(page)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(shots / "asset_graph.png"))
                # The checks of pseudo_labels: the failing blocking check, its reason and metadata.
                page.goto(f"{url}/assets/pseudo_labels?view=checks", wait_until="domcontentloaded")
                for name in ("pseudo_labels_distribution", "pseudo_labels_valid", "Failed", "failing_days"):
                    page.get_by_text(name).first.wait_for(timeout=60_000)
                _dismiss_welcome(page)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / "pseudo_labels_checks.png"), full_page=True)
                body = page.inner_text("body")
                assert "This is a blocking asset check" in body
                assert f"FAILED on 1 of 1 partition(s): {BAD_DAY}: pseudo_label_mean: observed 1" in body
                assert "high_confidence_positive_share" in body
            finally:
                browser.close()
    finally:
        _stop_group(server)
    assert server.poll() is not None
    for shot in ("asset_graph.png", "pseudo_labels_checks.png"):
        assert (shots / shot).stat().st_size > 10_000
    print(f"screenshots: {shots}")
