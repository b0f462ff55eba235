"""`make ui`: the Dagster UI (webserver, daemon, code server: ``dagster dev``) behind a small local
proxy, and a supervisor that stops all of it promptly.

Why a proxy: the Dagster webserver has no CSRF defence; it executes GraphQL mutations sent as GET and
accepts any ``Origin``, so any web page open in the user's browser could act on the instance. The
proxy (the only listener on the public port, 127.0.0.1) refuses requests whose ``Host`` is not this
address (DNS rebinding), whose ``Origin`` is another origin, whose ``Sec-Fetch-Site`` is not
same-origin (cross-site and same-site pages, other local ports included), GraphQL over GET (the path
checked as the webserver decodes it) and request paths that do not decode to one canonical path. The
webserver itself listens on a random 127.0.0.1 port under a random path prefix that only the proxy
knows, so a page that finds the port still cannot reach it. What remains is in docs/OPERATIONS.md.

Why a supervisor: ``dagster dev`` was seen staying up for more than 30 s after SIGINT/SIGTERM. Here
it runs in its own session; SIGINT, SIGTERM or SIGHUP to this process (or to its process group, as
Ctrl-C in a terminal or ``kill -TERM -- -PGID`` do) asks it to stop, then SIGTERM, then SIGKILL after
``--grace`` seconds, and every process it started is gone before this one exits.
"""

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import psutil

from gpl_platform.cli import instance
from gpl_platform.config import load_settings

MAX_HEAD = 64 * 1024
SAFE_FETCH_SITES = {"same-origin", "none"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _response(status: str, text: str, extra: str = "") -> bytes:
    body = (text + "\n").encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode() + body


def routed_path(target: str) -> str | None:
    """The path the webserver routes for a request target, or None when that is ambiguous.

    uvicorn percent-decodes the path once and Starlette routes the result as is: the checks run on that
    decoded path, and the raw target is forwarded unchanged, so upstream it decodes to the very path
    checked (``%67raphql`` is ``graphql`` to both). Anything whose decoded path is not canonical (double
    encoding, backslashes, ``;``, control characters, dot or empty segments; a fragment; an absolute-form
    target), which the UI never sends, is refused rather than normalised: one reading per request, and
    no re-encoding that would have to agree with every layer behind the proxy.
    """
    if not target.startswith("/") or "#" in target or not all("!" <= c <= "~" for c in target):
        return None
    path = unquote(target.partition("?")[0])
    if any(c in path for c in "%\\;") or not path.isprintable():
        return None
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        return None
    return path


def _is_websocket(headers: dict[str, str]) -> bool:
    """A WebSocket handshake as uvicorn sees one (both headers), not just an ``Upgrade`` header."""
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    return headers.get("upgrade", "").lower() == "websocket" and "upgrade" in connection


class OriginGuard:
    """Decides whether one HTTP request head may pass to the webserver, and rewrites it."""

    def __init__(self, public_host: str, public_port: int, prefix: str, upstream_port: int):
        self.hosts = {f"{h}:{public_port}" for h in (public_host, "127.0.0.1", "localhost", "[::1]")}
        self.origins = {f"http://{h}" for h in self.hosts}
        self.prefix, self.upstream = prefix, f"127.0.0.1:{upstream_port}"

    def check(self, method: str, target: str, headers: dict[str, str]) -> bytes | None:
        """None when the request may pass, else the refusal to send back."""
        if headers.get("host", "").lower() not in self.hosts:
            return _response("421 Misdirected Request", "refused: Host is not this local UI (DNS rebinding?)")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return _response("403 Forbidden", f"refused: cross-origin request from {origin}")
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in SAFE_FETCH_SITES:
            return _response("403 Forbidden", f"refused: request from another site (Sec-Fetch-Site: {site})")
        path = routed_path(target)
        if path is None:
            return _response(
                "400 Bad Request",
                "refused: ambiguous request target (double encoding, '\\', ';', control characters, dot or empty"
                " segments, a fragment, or not /path?query)",
            )
        # Any query string on a GET to a graphql path, however its name is spelled (%71uery=): the webserver
        # decodes it. GET without a query is the GraphiQL page; a real WebSocket handshake never reaches
        # the HTTP endpoint (one with Upgrade but no Connection: upgrade does: uvicorn serves it as HTTP).
        if method.upper() == "GET" and "/graphql" in path.lower() and "?" in target and not _is_websocket(headers):
            return _response("405 Method Not Allowed", "refused: GraphQL over GET (use POST)", "Allow: POST\r\n")
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            return _response("302 Found", "", f"Location: {self.prefix}{target}\r\n")
        return None

    def rewrite(self, method: str, target: str, version: str, headers: list[tuple[str, str]]) -> bytes:
        websocket = _is_websocket({k.lower(): v for k, v in headers})
        lines = [f"{method} {target} {version}"]
        for key, value in headers:
            if key.lower() == "host":
                value = self.upstream
            elif key.lower() in ("connection", "keep-alive") and not websocket:
                continue  # one request per connection: every request is checked
            lines.append(f"{key}: {value}")
        if not websocket:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # already closed by the other side
            pass


def make_handler(guard: OriginGuard, upstream_port: int):
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            client_writer.close()
            return
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in header_lines if ":" in line]
        except ValueError:
            client_writer.write(_response("400 Bad Request", "malformed request"))
            client_writer.close()
            return
        refusal = guard.check(method, target, {k.lower(): v for k, v in headers})
        if refusal is not None:
            client_writer.write(refusal)
            await client_writer.drain()
            client_writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.write(_response("502 Bad Gateway", "the Dagster webserver is not up yet: retry in a moment"))
            client_writer.close()
            return
        up_writer.write(guard.rewrite(method, target, version, headers))
        await asyncio.gather(_pipe(client_reader, up_writer), _pipe(up_reader, client_writer))

    return handle


class Supervisor:
    """Runs ``dagster dev`` in its own session and stops it (and everything it started) on request."""

    def __init__(self, upstream_port: int, prefix: str, grace_s: float):
        self.upstream_port, self.prefix, self.grace_s = upstream_port, prefix, grace_s
        self.process: subprocess.Popen | None = None
        self.known: set[psutil.Process] = set()

    def start(self) -> None:
        home = Path(os.environ["DAGSTER_HOME"])  # set by main() (instance.prepare)
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(home / "tmp"), "DAGSTER_WEBSERVER_PATH_PREFIX": self.prefix}
        root = Path(__file__).resolve().parent.parent
        command = [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-m",
            "assets.definitions",
            "-d",
            str(root),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.upstream_port),
        ]
        # cwd: DAGSTER_HOME, so that dagster dev does not warn about the repository's dagster.yaml
        self.process = subprocess.Popen(command, env=env, cwd=home, start_new_session=True)

    def remember_children(self) -> None:
        """Descendants change process group and are re-parented when their parent dies: keep them."""
        try:
            self.known |= set(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def alive(self) -> list[psutil.Process]:
        procs = set(self.known)
        try:
            procs.add(psutil.Process(self.process.pid))
        except psutil.NoSuchProcess:
            pass
        return [p for p in procs if _running(p)]

    def stop(self) -> None:
        if self.process is None:
            return
        self.remember_children()
        for sig, wait_s in ((signal.SIGINT, self.grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = self.alive()
            if not alive:
                break
            _signal_group(self.process.pid, sig)
            for proc in alive:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.2)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def serve(host: str, port: int, grace_s: float) -> int:
    upstream_port, prefix = free_port(), "/" + secrets.token_urlsafe(18)
    guard = OriginGuard(host, port, prefix, upstream_port)
    server = await asyncio.start_server(make_handler(guard, upstream_port), host, port, limit=MAX_HEAD)
    supervisor = Supervisor(upstream_port, prefix, grace_s)
    supervisor.start()
    print(f"Dagster UI: http://{host}:{port}  (Ctrl-C stops the webserver, daemon and code server)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if supervisor.process.poll() is not None:
            print(f"dagster dev exited with code {supervisor.process.returncode}", file=sys.stderr, flush=True)
            break
        supervisor.remember_children()
        try:
            await asyncio.wait_for(stop.wait(), timeout=2)
        except TimeoutError:
            pass
    server.close()
    print("stopping the Dagster UI ...", flush=True)
    began = time.monotonic()
    await loop.run_in_executor(None, supervisor.stop)
    left = supervisor.alive()
    print(
        f"stopped in {time.monotonic() - began:.1f}s" + (f"; still running: {[p.pid for p in left]}" if left else ""),
        flush=True,
    )
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="public address (keep it local: the UI has no login)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 3000)))
    parser.add_argument("--grace", type=float, default=6.0, help="seconds dagster dev gets to stop by itself")
    args = parser.parse_args(argv)
    try:  # the instance of the data directory it shows, checked before anything is started
        instance.prepare(load_settings().data_dir)
    except instance.InstanceMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    create_instance_storage()
    return asyncio.run(serve(args.host, args.port, args.grace))


def create_instance_storage() -> None:
    """Create the instance's SQLite stores (runs, event-log index, schedules) here, once, before `dagster dev`
    starts its webserver, daemon and code server: on a fresh instance all three create and stamp the same
    database at the same moment, and a double stamp ("more than one head present") stopped the code server
    (seen once under load, in the browser test)."""
    from dagster import DagsterInstance

    with DagsterInstance.get():  # the SQLite storage creates its databases when it is built
        pass


if __name__ == "__main__":
    sys.exit(main())
