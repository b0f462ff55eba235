"""``engine: ray``: the GPL stages' batch work on a Ray cluster.

Batch jobs go through parquet files in ``ray.staging_dir``: the driver writes each batch's inputs with
DuckDB ``COPY``, a worker actor reads them with pyarrow, runs the job's function and writes its output
beside them, and the driver inserts that file into its open transaction. At most two batches per
worker are in flight, so the staging directory and the object store hold a bounded amount of data.
Maps (anchor generation, text encoding) send their payloads through the object store; the model each
needs is built once per actor (:class:`~gpl_platform.engine.base.Shared`).

Addresses: ``local`` starts a private single-node cluster (:class:`LocalRayCluster`, loopback only,
free ports, its own token, no dashboard) for the life of this process; ``auto`` joins the cluster
``ray start`` began on this machine; ``HOST:PORT`` a cluster's GCS; ``ray://HOST:10001`` Ray Client
(the repository's code is shipped as a runtime-env module; the model packages must be installed on
the cluster's image, and ``staging_dir`` must be storage every node sees).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpl_platform.config import RayConfig, StreamingConfig
from gpl_platform.data.sql import quote_literal
from gpl_platform.engine.base import BatchJob, Engine, Shared

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

# Variables of a private local cluster and of the drivers and workers that use it.
_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # single-node mode: Ray binds its servers to 127.0.0.1 instead of the machine's address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
}
_WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Ray's components that would otherwise pick their own ports (possibly a port another cluster on this
# machine holds)
_COMPONENT_PORT_FLAGS = (
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


# what `ray start` says when a port it was given is in use
_PORT_TAKEN_SIGNS = ("is used by other components", "Address already in use", "is already in use")


class _PortTaken(RuntimeError):
    pass


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: the sockets are held open together, since ports asked for one
    at a time can repeat (Ray refuses to start when two of its components share one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LocalRayCluster:
    """A single-node Ray cluster on this machine that belongs to whoever started it: ``ray start --head
    --block`` in its own process group, loopback only, free ports, a random auth token, no dashboard,
    no usage stats, its own temp dir. :meth:`stop` ends that process group (and nothing else)."""

    def __init__(self, num_cpus: int = 2, ray_bin: str | None = None, start_timeout_s: float = 120.0):
        self.num_cpus = num_cpus
        self.ray_bin = ray_bin or str(Path(sys.executable).with_name("ray"))
        self.start_timeout_s = start_timeout_s
        self.token = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self._choose_ports_and_temp_dir()

    def _choose_ports_and_temp_dir(self) -> None:
        self.port, self.client_port, *component_ports = _free_ports(2 + len(_COMPONENT_PORT_FLAGS))
        self.component_ports = dict(zip(_COMPONENT_PORT_FLAGS, component_ports, strict=True))
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gplray-", dir="/tmp"))  # short: Ray's socket paths

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        """The cluster's Ray Client server (``ray://``), as a driver on another machine would join it."""
        return f"ray://127.0.0.1:{self.client_port}"

    def env(self) -> dict[str, str]:
        """Variables a driver needs to join this cluster (set them before ``import ray``)."""
        return {**_LOCAL_ENV, "RAY_AUTH_TOKEN": self.token}

    def start(self, attempts: int = 3) -> LocalRayCluster:
        """Start the cluster; a port taken by another process between choosing it and Ray binding it is
        retried with fresh ports (``attempts`` in all)."""
        for _ in range(attempts - 1):
            try:
                return self._start_once()
            except _PortTaken as taken:
                log.warning("local Ray cluster: a chosen port was taken, retrying with fresh ports (%s)", taken)
                self._choose_ports_and_temp_dir()
        return self._start_once()

    def _start_once(self) -> LocalRayCluster:
        ports = {**self.component_ports, "--ray-client-server-port": self.client_port}
        cmd = [
            self.ray_bin,
            "start",
            "--head",
            "--block",
            "--num-cpus",
            str(self.num_cpus),
            "--port",
            str(self.port),
            "--node-ip-address",
            "127.0.0.1",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            str(self.temp_dir),
        ]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        log_path = self.temp_dir / "ray_start.log"
        # the Ray Client proxy waits this long for a client's own server process (30 s by default: too short
        # for a process that imports Ray on a busy 2-core machine)
        env = {**os.environ, **self.env(), **_WORKER_ENV, "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"}
        with open(log_path, "w") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"`ray start` exited with {self.process.returncode}:\n{log_path.read_text()[-3000:]}"
                self.stop()  # its process group and temp dir (the log is in the message)
                if any(sign in message for sign in _PORT_TAKEN_SIGNS):
                    raise _PortTaken(message)
                raise RuntimeError(message)
            if "Ray runtime started" in log_path.read_text():
                log.info("local Ray cluster at %s (%d CPUs, logs in %s)", self.address, self.num_cpus, self.temp_dir)
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the local Ray cluster did not start within {self.start_timeout_s:.0f}s: {log_path}")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.process.wait(timeout=grace_s)
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # members that exited but were not reaped yet (zombies) still count for killpg(0)
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class _Worker:
    """A Ray actor: caches what :class:`Shared` builds and runs batch jobs over staged parquet."""

    def __init__(self):
        self._shared: dict[tuple, object] = {}

    def _get(self, key: tuple, holder: list):
        if key not in self._shared:
            import ray

            value = ray.get(holder[0])
            self._shared = {key: value.build() if isinstance(value, Shared) else value}
        return self._shared[key]

    def call(self, fn, key: tuple, holder: list, payload):
        return fn(self._get(key, holder), payload)

    def run_batch(self, key: tuple, holder: list, inputs: dict[str, str], out_path: str) -> int:
        import pyarrow.parquet as pq

        fn, context = self._get(key, holder)
        tables = {name: pq.read_table(path) for name, path in inputs.items()}
        out = fn(tables, context)
        pq.write_table(out, out_path + ".tmp")
        os.replace(out_path + ".tmp", out_path)
        return out.num_rows

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


_CLUSTER: LocalRayCluster | None = None


def _connect(cfg: RayConfig) -> None:
    """ray.init for ``cfg.address`` (once per process)."""
    global _CLUSTER
    address = cfg.address
    runtime_env: dict = {"env_vars": dict(_WORKER_ENV)}
    if address == "local":
        if "ray" in sys.modules and not os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            log.warning(
                "ray was imported before the local cluster's settings: the driver may look for it on the "
                "machine's address instead of 127.0.0.1 (set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first)"
            )
        if _CLUSTER is None:
            os.environ.update(_LOCAL_ENV)
            _CLUSTER = LocalRayCluster(num_cpus=cfg.workers).start()
            atexit.register(_shutdown_local)
        os.environ.update(_CLUSTER.env())
        address = _CLUSTER.address
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address.split(":")[0] in ("127.0.0.1", "localhost"):  # a single-node cluster bound to loopback
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if address.startswith("ray://"):
            import gpl_platform

            runtime_env["py_modules"] = [str(Path(gpl_platform.__file__).parent)]
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)


def _shutdown_local() -> None:
    global _CLUSTER
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None


class RayEngine(Engine):
    name = "ray"

    def __init__(self, cfg: RayConfig, streaming: StreamingConfig | None = None):
        super().__init__(streaming)
        self.cfg = cfg
        self.workers = cfg.workers
        self.staging_dir = Path(cfg.staging_dir or Path(tempfile.gettempdir()) / "gpl-staging")
        self._actors: list = []

    def describe(self) -> dict:
        return {**super().describe(), "address": self.cfg.address}

    def _pool(self):
        if not self._actors:
            _connect(self.cfg)  # first: it sets the variables Ray reads when it is imported
            import ray

            actor = ray.remote(num_cpus=1)(_Worker)
            self._actors = [actor.remote() for _ in range(self.workers)]
        from ray.util import ActorPool

        return ActorPool(self._actors)

    @staticmethod
    def _share(value) -> list:
        import ray

        return [ray.put(value)]  # in a list: the actor fetches it only when its cache misses

    def map(self, fn, shared: Shared, payloads: Sequence) -> list:
        if not payloads:
            return []
        pool = self._pool()
        holder = self._share(shared)
        return list(pool.map(lambda a, p: a.call.remote(fn, shared.key, holder, p), list(payloads)))

    def run(self, con, job: BatchJob, batches: Sequence[int]) -> Iterator[duckdb.DuckDBPyRelation]:
        pool = self._pool()
        key = ("job", job.name, uuid.uuid4().hex)
        holder = self._share((job.fn, job.context))
        stage = self.staging_dir / f"{job.name}-{key[2][:12]}"
        stage.mkdir(parents=True, exist_ok=True)
        in_flight: list[tuple[int, str]] = []
        try:
            for batch in batches:
                inputs = {}
                for name, sql in job.inputs(batch).items():
                    path = str(stage / f"b{batch:06d}-{name}.parquet")
                    con.execute(f"COPY ({sql}) TO {quote_literal(path)} (FORMAT parquet)")
                    inputs[name] = path
                out = str(stage / f"b{batch:06d}-out.parquet")
                pool.submit(lambda a, v: a.run_batch.remote(key, holder, *v), (inputs, out))
                in_flight.append((batch, out))
                if len(in_flight) >= 2 * self.workers:
                    yield from self._collect(con, pool, in_flight.pop(0), stage)
            while in_flight:
                yield from self._collect(con, pool, in_flight.pop(0), stage)
        finally:
            while pool.has_next():  # a failure: let the other batches end before their files go
                try:
                    pool.get_next()
                except Exception:  # noqa: BLE001 - the first error is the one being raised
                    pass
            shutil.rmtree(stage, ignore_errors=True)

    def _collect(self, con, pool, item: tuple[int, str], stage: Path) -> Iterator[duckdb.DuckDBPyRelation]:
        batch, out = item
        pool.get_next()  # results come back in submission order: this is `batch`
        try:
            yield con.read_parquet(out)
        finally:
            for path in stage.glob(f"b{batch:06d}-*"):
                path.unlink(missing_ok=True)

    def worker_peak_rss_mb(self) -> list[float]:
        import ray

        return ray.get([a.peak_rss_mb.remote() for a in self._actors]) if self._actors else []

    def close(self) -> None:
        """End the actors (the cluster stays: ``local`` clusters end with the process)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
