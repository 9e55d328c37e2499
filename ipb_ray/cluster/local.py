"""A throwaway multi-node Ray cluster on this machine, with an MLflow server beside it.

For rehearsing a cluster run on a laptop (``ipb local-cluster``), and for the tests and
benchmarks of ``ipb submit``. It runs what a real cluster runs: a head started with
``ray start --head --dashboard-host 127.0.0.1``, worker nodes started with ``ray start
--address``, each node with its own temp directory (as on separate machines), and
``mlflow server`` with a SQLite database and a proxied artifact store. Every node is a
127.0.0.1 node (:mod:`ipb_ray.cluster.loopback_node`: plain ``ray start`` would listen on
every interface), so everything listens on 127.0.0.1 only (:meth:`LocalCluster.exposed`
checks it), Ray's token authentication is on (``RAY_AUTH_MODE=token``; the token is
Ray's own ``~/.ray/auth_token``, generated when missing, which local clients send), and
every process is stopped on :meth:`LocalCluster.stop` (never ``ray stop``, which would
also stop any other Ray on this machine).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["LOOPBACK", "LocalCluster", "PORT_RANGE", "free_ports"]

log = logging.getLogger(__name__)

# Ports for our processes come from below the kernel's ephemeral range (32768+ on Linux,
# where Ray's components and every other bind(0) land) and above Ray's worker-port range
# (10002-19999): a port chosen here is not taken by a Ray process that starts meanwhile.
PORT_RANGE = (20000, 32000)


def free_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` distinct TCP ports in :data:`PORT_RANGE`, free on 127.0.0.1 right now."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(n * 200):
        if len(chosen) == n:
            break
        port = rng.randrange(*PORT_RANGE)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) < n:
        raise RuntimeError(f"found only {len(chosen)} free ports of {n} in {PORT_RANGE}")
    return chosen


#: the addresses a socket listening only on this machine shows
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@dataclass
class LocalCluster:
    """``workers`` worker nodes besides the head, ``cpus`` logical CPUs per node; logs
    and the MLflow store under ``work``. Use as a context manager or start()/stop()."""

    work: Path
    workers: int = 1
    cpus: int = 2
    object_store_mb: int = 150
    mlflow: bool = True
    timeout_s: float = 120.0
    address: str = ""  # the job API, http://127.0.0.1:PORT
    gcs_address: str = ""  # 127.0.0.1:PORT, for `ray start --address` and `--address` of ipb commands
    mlflow_uri: str = ""  # http://127.0.0.1:PORT ("" without mlflow)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _temps: list[str] = field(default_factory=list)
    _logs: list[Any] = field(default_factory=list)

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    @staticmethod
    def _ray_start() -> list[str]:
        """``ray start`` as a node on 127.0.0.1 only (:mod:`ipb_ray.cluster.loopback_node`)."""
        return [sys.executable, "-m", "ipb_ray.cluster.loopback_node", "start"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   RAY_AUTH_MODE="token")
        env.pop("RAY_ADDRESS", None)
        return env

    def _ensure_token(self) -> None:
        """Ray's token for this user, created when there is none (it stays out of every log)."""
        if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
                or (Path.home() / ".ray" / "auth_token").is_file():
            return
        # the command prints the token: captured and dropped
        subprocess.run([self._bin("ray"), "get-auth-token", "--generate"], capture_output=True, check=True)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "w")
        self._logs.append(log)
        # a session of its own: stop() ends the node and every process it started
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                           cwd=self.work, start_new_session=True))

    def _node_args(self, name: str) -> list[str]:
        agent, grpc, metrics, renv, manager = free_ports(5)
        # short temp paths: Ray's Unix sockets live there and have a length limit
        temp = tempfile.mkdtemp(prefix=f"ipb-{name}-", dir="/tmp")
        self._temps.append(temp)
        return ["--block", f"--temp-dir={temp}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                "--node-ip-address=127.0.0.1", f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
                f"--node-manager-port={manager}", "--disable-usage-stats"]

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout_s:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: `{' '.join(p.args[:3])}` exited with {p.returncode}; "
                                       f"see the logs in {self.work}")
            try:
                if ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {self.timeout_s:.0f} s; see the logs in {self.work}")

    def listening(self) -> list[tuple[str, str, int]]:
        """(process name, address, port) of every listening TCP socket of this cluster's
        processes (its nodes, what they started, the MLflow server): what ``ss -ltnp``
        shows for them."""
        import psutil

        sessions = {p.pid for p in self.procs if p.poll() is None}
        out = set()
        for conn in psutil.net_connections(kind="inet"):
            if conn.status != psutil.CONN_LISTEN or not conn.pid:
                continue
            try:
                if os.getsid(conn.pid) in sessions:
                    out.add((psutil.Process(conn.pid).name(), conn.laddr.ip, conn.laddr.port))
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue
        return sorted(out)

    def exposed(self) -> list[tuple[str, str, int]]:
        """:meth:`listening` beyond the loopback interface (empty when all is local)."""
        return [x for x in self.listening() if x[1] not in LOOPBACK]

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        return len([n for n in list_nodes(address=self.address) if n.state == "ALIVE"])

    def start(self, attempts: int = 2) -> "LocalCluster":
        """Start everything and wait until it answers; a try whose process exits early
        (a port taken after all, say) is stopped and made again with new ports."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("local cluster: %s; starting again with new ports", exc)
                time.sleep(1.0)
        return self

    def _start_once(self) -> "LocalCluster":
        from ray.job_submission import JobSubmissionClient

        self.work = Path(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._ensure_token()
        from ipb_ray.cluster.submit import send_token_if_available

        send_token_if_available()  # this process's own checks below go through token auth too
        gcs, dash, client, mlflow_port = free_ports(4)
        self.address, self.gcs_address = f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
        try:
            self._spawn("head", [*self._ray_start(), "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                 *self._node_args("head")])
            if self.mlflow:
                port = mlflow_port
                self.mlflow_uri = f"http://127.0.0.1:{port}"
                self._spawn("mlflow", [self._bin("mlflow"), "server", "--backend-store-uri",
                                       f"sqlite:///{self.work / 'mlflow.db'}", "--artifacts-destination",
                                       str(self.work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                       "--workers", "1"])
            self._wait("the Ray head's job API", lambda: JobSubmissionClient(self.address).list_jobs() is not None)
            for i in range(self.workers):
                self._spawn(f"worker{i}", [*self._ray_start(), f"--address={self.gcs_address}",
                                           *self._node_args(f"w{i}")])
            self._wait(f"{self.workers} worker node(s)", lambda: self.alive_nodes() == self.workers + 1)
            if self.mlflow:
                self._wait("the MLflow server",
                           lambda: urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=5).status == 200)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this cluster started (TERM, then KILL for what remains)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:  # the agents and workers the node started, if still there
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        for temp in self._temps:
            shutil.rmtree(temp, ignore_errors=True)
        self._temps.clear()

    def tail_logs(self, chars: int = 3000) -> str:
        """The end of every process's log (for failure messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.work.glob("*.log")))

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
