"""End to end through the Dagster UI as `make ui` serves it (assets/ui.py: dagster dev behind the
local proxy), in headless Chromium.

A temp Dagster instance gets a GPL materialization of all days and a failing blocking check (one
day's labels saturated on purpose); the UI starts on a free 127.0.0.1 port in its own process group;
Playwright drives Debian's /usr/bin/chromium to the asset graph and to the checks of
`pseudo_labels` (the failing day is named per partition) and saves screenshots under the test's temp
dir. Cross-origin requests through the proxy are refused (a `deleteRun` sent as GET with a foreign
Origin deletes nothing), and SIGTERM to the UI's process group leaves no process behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import date
from pathlib import Path

import psutil
import pytest

from assets.ui import free_port

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
HISTORY = json.dumps({"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}})
PIPELINE = [
    "candidate_events",
    "user_histories",
    "user_anchors",
    "anchor_embeddings",
    "candidate_similarities",
    "similarity_calibration",
    "pseudo_labels",
]
GPL_ASSETS = ["user_anchors", "anchor_embeddings", "item_embeddings", "pseudo_labels"]  # full names on the graph
BAD_DAY = "2024-01-05"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MARKER = "GPL_TEST_UI_MARKER"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)"),
]


def _materialize_into(home: Path, data: Path, monkeypatch) -> str:
    """The GPL graph for all days, then a saturated BAD_DAY and its (failing) label checks; returns a run id."""
    from dagster import AssetSelection, DagsterInstance

    from assets.definitions import build_definitions
    from assets.partitions import range_tags
    from assets.resources import GplSettings
    from tests.helpers import run_assets

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    gpl = GplSettings(data_dir=str(data), overrides_json=HISTORY)
    defs = build_definitions(gpl=gpl)
    with DagsterInstance.get() as instance:
        first = run_assets(defs, gpl, ["item_catalog", "users", "item_embeddings"], instance)
        assert first.success
        assert run_assets(
            defs, gpl, AssetSelection.assets(*PIPELINE), instance, tags=range_tags("2024-01-01", BAD_DAY)
        ).success
        assert run_assets(defs, gpl, ["label_audit"], instance).success
        with gpl.warehouse().transaction() as con:
            con.execute(
                "UPDATE pseudo_labels SET pseudo_label = 1.0, confidence = 1.0 WHERE day = ?",
                [date.fromisoformat(BAD_DAY)],
            )
        bad = run_assets(
            defs,
            gpl,
            AssetSelection.checks_for_assets("pseudo_labels"),
            instance,
            raise_on_error=False,
            tags=range_tags("2024-01-04", BAD_DAY),
        )
        assert not bad.success
        evaluation = {(e.check_name, e.partition): e.passed for e in bad.get_asset_check_evaluations()}
        assert evaluation[("pseudo_labels_distribution", BAD_DAY)] is False
        assert evaluation[("pseudo_labels_distribution", "2024-01-04")] is True
        return first.run_id


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _prefix(url: str) -> str:
    """The webserver's secret path prefix, as the proxy's redirect of / tells a same-origin client."""
    try:
        urllib.request.build_opener(_NoRedirect).open(f"{url}/", timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code == 302:
            return urllib.parse.urlsplit(exc.headers["Location"]).path.rstrip("/")
        raise
    raise AssertionError("the proxy did not redirect / to the webserver's prefix")


def _wait_for_ui(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Waits until a GraphQL query through the proxy answers; returns the graphql URL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the UI exited early:\n{log.read_text()[-3000:]}")
        try:
            graphql = f"{url}{_prefix(url)}/graphql"
            status, body = _request(
                graphql, json.dumps({"query": "{ version }"}).encode(), {"Content-Type": "application/json"}
            )
            if status == 200 and "version" in body:
                return graphql
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the UI did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _marked_processes(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def start_ui(command: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    marker = uuid.uuid4().hex
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env={**env, MARKER: marker}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, marker


def stop_and_wait(proc: subprocess.Popen, marker: str, sig: int, timeout: float = 90) -> float:
    """``sig`` to the UI's process group (a terminal's Ctrl-C, or kill -- -PGID); seconds until nothing it
    started is left (bounded: a hang fails the test)."""
    began = time.monotonic()
    os.killpg(proc.pid, sig)
    while time.monotonic() - began < timeout and (proc.poll() is None or _marked_processes(marker)):
        time.sleep(0.5)
    left = _marked_processes(marker)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"processes left {timeout}s after {signal.Signals(sig).name}: {left}"
    return time.monotonic() - began


def ui_env(home: Path, data: Path) -> dict:
    env = os.environ.copy()
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "GPL_DATA_DIR": str(data),
            "TMPDIR": str(home / "tmp"),
            "PYTHONPATH": str(ROOT),
            "GPL_ANCHORS__BACKEND": "history",
            "GPL_CALIBRATION__MIN_SAMPLES": "50",
            # nothing but this test writes the instance: no sensor or automation runs
            "GPL_AUTOMATION__SENSORS_RUNNING": "false",
        }
    )
    return env


def launch_ui(tmp_path: Path):
    """`python -m assets.ui` on a free port with a fresh Dagster home (the project's dagster.yaml) and data
    directory: (home, data, url, log, process, marker) as :func:`start_ui` gives them."""
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    for folder in (home / "tmp", data):
        folder.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log = tmp_path / "ui.log"
    ui, marker = start_ui([sys.executable, "-m", "assets.ui", "--port", str(port)], ui_env(home, data), log)
    return home, data, f"http://127.0.0.1:{port}", log, ui, marker


def test_ui_behind_the_proxy_shows_failing_days_refuses_foreign_origins_and_stops(tmp_path, monkeypatch):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    home, data, url, log, ui, marker = launch_ui(tmp_path)
    try:
        # The UI starts while this process materializes into the same instance.
        run_id = _materialize_into(home, data, monkeypatch)
        graphql = _wait_for_ui(url, ui, log)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            # Playwright gives every launch a fresh, empty profile directory (--user-data-dir).
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                # The asset graph (lineage) of the `gpl` group: every GPL asset is a node.
                page.goto(f"{url}/locations/assets.definitions/asset-groups/gpl/lineage", wait_until="domcontentloaded")
                for name in GPL_ASSETS:
                    page.get_by_text(name, exact=True).first.wait_for(timeout=90_000)
                for part in ("_similarities", "_calibration"):  # long names are shortened on the nodes
                    page.get_by_text(part).first.wait_for(timeout=10_000)
                page.wait_for_timeout(1500)
                assert "Join the Dagster community" not in page.inner_text("body")  # nux off in dagster.yaml
                page.screenshot(path=str(shots / "asset_graph.png"))
                # The checks of pseudo_labels: the failing blocking check names the failing day.
                page.goto(f"{url}/assets/pseudo_labels?view=checks", wait_until="domcontentloaded")
                for name in ("pseudo_labels_distribution", "pseudo_labels_valid", "Failed"):
                    page.get_by_text(name).first.wait_for(timeout=60_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / "pseudo_labels_checks.png"), full_page=True)
                body = page.inner_text("body")
                assert "This is a blocking asset check" in body
                assert f"pseudo-label distribution FAILED on {BAD_DAY}: pseudo_label_mean: observed 1" in body
                assert "high_confidence_positive_share" in body
            finally:
                browser.close()

        # A foreign page cannot act on the instance: a deleteRun as GET with its Origin is refused ...
        mutation = 'mutation { deleteRun(runId: "' + run_id + '") { __typename } }'
        status, body = _request(
            f"{graphql}?" + urllib.parse.urlencode({"query": mutation}), headers={"Origin": "http://evil.example.com"}
        )
        assert status == 403 and "cross-origin" in body
        status, body = _request(f"{graphql}?" + urllib.parse.urlencode({"query": mutation}))
        assert status == 405  # GraphQL over GET, even without an Origin (an <img> or a link)
        status, _ = _request(
            graphql,
            json.dumps({"query": mutation}).encode(),
            {"Content-Type": "application/json", "Origin": "http://evil.example.com"},
        )
        assert status == 403
        status, _ = _request(
            graphql,
            json.dumps({"query": mutation}).encode(),
            {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"},
        )
        assert status == 403  # a page on another local port is same-site, not same-origin
        status, _ = _request(
            graphql,
            json.dumps({"query": "{ version }"}).encode(),
            {"Content-Type": "application/json", "Host": "rebound.example.com"},
        )
        assert status == 421
        # ... and the run is still there (asked the same-origin way, which works).
        status, body = _request(
            graphql,
            json.dumps({"query": '{ runOrError(runId: "' + run_id + '") { __typename } }'}).encode(),
            {"Content-Type": "application/json", "Origin": url},
        )
        assert status == 200 and '"Run"' in body
        seconds = stop_and_wait(ui, marker, signal.SIGTERM)
        print(f"UI stopped {seconds:.1f}s after SIGTERM to its process group; screenshots: {shots}")
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
    for shot in ("asset_graph.png", "pseudo_labels_checks.png"):
        assert (shots / shot).stat().st_size > 10_000


def test_make_ui_stops_on_ctrl_c(tmp_path):
    """`make ui` in a terminal: Ctrl-C (SIGINT to the foreground process group) stops everything."""
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    for folder in (home / "tmp", data):
        folder.mkdir(parents=True)
    port = free_port()
    log = tmp_path / "ui.log"
    ui, marker = start_ui(["make", "ui", f"PORT={port}", f"DAGSTER_HOME={home}"], ui_env(home, data), log)
    try:
        _wait_for_ui(f"http://127.0.0.1:{port}", ui, log)
        assert (home / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()  # make copied it
        seconds = stop_and_wait(ui, marker, signal.SIGINT)
        print(f"make ui stopped {seconds:.1f}s after Ctrl-C")
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
