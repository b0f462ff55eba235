"""The UI proxy's request check (assets/ui.py ``OriginGuard``) against spellings of the GraphQL path.

uvicorn percent-decodes the request path before Starlette routes it, so the proxy must judge the
decoded path: ``GET /<prefix>/%67raphql?query=mutation{...}`` once passed the proxy and ran the
mutation. Unit tests of ``OriginGuard.check`` for the spellings, then one end-to-end run through the
real proxy in front of a real ``dagster dev`` (empty instance) showing the webserver never sees them.
"""

import json
import signal
import socket
import urllib.parse
import uuid

import pytest

from assets.ui import OriginGuard

PREFIX = "/Pr3fix-x_Y"
PUBLIC = "127.0.0.1:3000"
MUTATION = "query=" + urllib.parse.quote('mutation { deleteRun(runId: "x") { __typename } }')
WEBSOCKET = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


def _status(method: str, target: str, headers: dict | None = None) -> int | None:
    """The status of the proxy's refusal, None when the request may pass."""
    guard = OriginGuard("127.0.0.1", 3000, PREFIX, 4000)
    refusal = guard.check(method, target, {"host": PUBLIC, **(headers or {})})
    return None if refusal is None else int(refusal.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "target",
    [
        f"{PREFIX}/graphql?{MUTATION}",
        f"{PREFIX}/%67raphql?{MUTATION}",  # the report: the webserver decodes %67 to g
        f"{PREFIX}/%67%72%61%70%68%71%6c?{MUTATION}",
        f"{PREFIX}%2Fgraphql?{MUTATION}",  # decodes to PREFIX/graphql: under the prefix after all
        f"{PREFIX}/GRAPHQL?{MUTATION}",  # Starlette routes case-sensitively, but no case may pass
        f"{PREFIX}/Gr%41phql?{MUTATION}",
        f"{PREFIX}/graphql/?{MUTATION}",
        f"{PREFIX}/%67raphql?%71uery=mutation",  # the parameter's name encoded: the webserver decodes it too
        f"{PREFIX}/graphql?Query=x",  # any query string at all
        f"{PREFIX}/%67raphql?",
        f"/%50r3fix-x_Y/%67raphql?{MUTATION}",  # the prefix encoded as well
    ],
)
def test_graphql_over_get_is_refused_in_any_spelling_of_the_path(target):
    assert _status("GET", target) == 405
    assert _status("get", target) == 405


@pytest.mark.parametrize(
    "target",
    [
        f"{PREFIX}/%2567raphql?{MUTATION}",  # double-encoded: decoded once here and upstream, twice elsewhere
        f"{PREFIX}/x/../graphql?{MUTATION}",
        f"{PREFIX}/x/%2E%2E/graphql?{MUTATION}",
        f"{PREFIX}/..%2Fgraphql?{MUTATION}",
        f"{PREFIX}/./graphql?{MUTATION}",
        f"{PREFIX}//graphql?{MUTATION}",
        f"{PREFIX}/%2Fgraphql?{MUTATION}",
        f"{PREFIX}/graphql;x?{MUTATION}",
        f"{PREFIX}/graphql%3Bx?{MUTATION}",
        f"{PREFIX}\\graphql?{MUTATION}",
        f"{PREFIX}/%5Cgraphql?{MUTATION}",
        f"{PREFIX}/graphql%0A?{MUTATION}",
        f"{PREFIX}/graphql%00?{MUTATION}",
        f"{PREFIX}/graphql#?{MUTATION}",
        f"http://{PUBLIC}{PREFIX}/graphql?{MUTATION}",  # absolute form
        f"{PREFIX}/gr\x7faphql?{MUTATION}",
        f"{PREFIX}/gr\xe4phql",
        f"{PREFIX}/%2e%2e/x",  # ambiguous paths are refused whatever they name
    ],
)
def test_ambiguous_paths_are_refused(target):
    assert _status("GET", target) == 400
    assert _status("POST", target) == 400


def test_what_the_ui_sends_still_passes():
    assert _status("GET", f"{PREFIX}/graphql") is None  # GraphiQL: GET without a query string
    assert _status("POST", f"{PREFIX}/graphql?op=RunsRootQuery") is None  # the UI's Apollo client
    assert _status("GET", f"{PREFIX}/assets/pseudo_labels?view=checks") is None
    assert _status("GET", f"{PREFIX}/") is None
    assert _status("GET", f"{PREFIX}/assets/a%20b") is None
    assert _status("GET", f"{PREFIX}/graphql?{MUTATION}", WEBSOCKET) is None  # subscriptions: a WebSocket
    assert _status("GET", "/") == 302 and _status("GET", "/locations/x") == 302


def test_an_upgrade_header_alone_is_no_websocket():
    """uvicorn serves a request with ``Upgrade: websocket`` but no ``Connection: upgrade`` as plain HTTP."""
    assert _status("GET", f"{PREFIX}/graphql?{MUTATION}", {"upgrade": "websocket"}) == 405
    assert _status("GET", f"{PREFIX}/graphql?{MUTATION}", {**WEBSOCKET, "connection": "keep-alive"}) == 405
    assert _status("GET", f"{PREFIX}/graphql?{MUTATION}", {**WEBSOCKET, "connection": "keep-alive, Upgrade"}) is None


def test_the_prefix_is_checked_on_the_decoded_path():
    # outside the prefix once decoded: sent to the prefix, never forwarded
    assert _status("GET", "/%50r3fix-x_Z/runs") == 302
    assert _status("GET", f"{PREFIX}x/runs") == 302
    assert _status("GET", "/%50r3fix-x_Y/runs") is None  # inside it once decoded, as the webserver sees it
    refusal = OriginGuard("127.0.0.1", 3000, PREFIX, 4000).check("GET", "/runs?a=b", {"host": PUBLIC})
    assert f"Location: {PREFIX}/runs?a=b\r\n".encode() in refusal


def _status_line(port: int, path: str, headers: str) -> str:
    """The first line of the answer to a GET written by hand (urllib cannot send ``Upgrade``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
        return sock.recv(4096).decode("latin-1").split("\r\n", 1)[0]


@pytest.mark.slow
def test_encoded_graphql_mutations_over_get_do_not_reach_the_webserver(tmp_path):
    """Through the real proxy and ``dagster dev``: before the fix the first request answered 200 with
    ``RunNotFoundError`` (the mutation ran)."""
    from tests.orchestration.test_ui_browser import (
        _prefix,
        _request,
        _wait_for_ui,
        launch_ui,
        stop_and_wait,
    )

    home, data, url, log, ui, marker = launch_ui(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        graphql = _wait_for_ui(url, ui, log)
        prefix = _prefix(url)
        mutation = "query=" + urllib.parse.quote(f'mutation {{ deleteRun(runId: "{uuid.uuid4()}") {{ __typename }} }}')
        for spelling in (f"{prefix}/%67raphql?{mutation}", f"{prefix}%2Fgraphql?{mutation}"):
            status, body = _request(f"{url}{spelling}")
            assert status == 405 and "GraphQL over GET" in body, (spelling, status, body)
        status, body = _request(f"{url}{prefix}/%2567raphql?{mutation}")
        assert status == 400 and "ambiguous" in body
        # What the UI itself does still works: POST (with the Apollo client's ?op=), the page, a WebSocket.
        status, body = _request(
            f"{graphql}?op=Version", json.dumps({"query": "{ version }"}).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200 and '"version"' in body
        status, body = _request(f"{url}{prefix}/assets")
        assert status == 200 and "<html" in body.lower()
        handshake = (
            f"Origin: {url}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: graphql-ws\r\n"
        )
        assert _status_line(port, f"{prefix}/graphql", handshake) == "HTTP/1.1 101 Switching Protocols"
        # An Upgrade header without Connection: upgrade is plain HTTP to uvicorn: no exception for it.
        upgrade_only = _status_line(port, f"{prefix}/graphql?{mutation}", "Upgrade: websocket\r\n")
        assert upgrade_only == "HTTP/1.1 405 Method Not Allowed"
    finally:
        if ui.poll() is None:  # SIGTERM to the proxy stops dagster dev (its own session) too; SIGKILL would orphan it
            stop_and_wait(ui, marker, signal.SIGTERM)


def test_make_ui_creates_the_instance_storage_before_it_starts_dagster_dev(tmp_path, monkeypatch):
    import sqlite3

    from assets.ui import create_instance_storage

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir:\n      env: DAGSTER_HOME\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    create_instance_storage()
    databases = [
        home / "history" / "runs.db",
        home / "history" / "runs" / "index.db",
        home / "schedules" / "schedules.db",
    ]
    for database in databases:  # each created and stamped once, so the three services only read the stamp
        with sqlite3.connect(database) as con:
            assert len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1, database
