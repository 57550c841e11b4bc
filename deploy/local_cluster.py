"""The compose deployment on one machine without Docker: uvicorn replicas and nginx, all on loopback.

Every process started here is stopped by `LocalCluster.close()` (a context manager does it on any exit), by
the process id this module got when it started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.nginx_config import REPO_ROOT, render_for_loopback

LOOPBACK = "127.0.0.1"
# A replica that needs longer than this to load and warm up its model is reported as broken.
READY_TIMEOUT_S = 300.0


class SystemToolUnavailable(RuntimeError):
    """A Debian-packaged tool (nginx, redis-server) is not installed and cannot be installed here (not root, or no
    apt-get)."""


class NginxUnavailable(SystemToolUnavailable):
    pass


class RedisUnavailable(SystemToolUnavailable):
    pass


class ClusterError(RuntimeError):
    pass


def ensure_nginx() -> str:
    """The path of the nginx binary, installing Debian's package first when missing and we are root (CI)."""
    return _ensure_debian_tool("nginx", "nginx", NginxUnavailable)


def ensure_redis_server() -> str:
    """The path of the redis-server binary, installing Debian's package first when missing and we are root (CI)."""
    return _ensure_debian_tool("redis-server", "redis-server", RedisUnavailable)


def _ensure_debian_tool(binary: str, package: str, unavailable: type[SystemToolUnavailable]) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise unavailable(f"{binary} is not installed and this is not root with apt-get: run `make system-deps` "
                          f"as root or `apt-get install -y {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise unavailable(f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}")
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if not found:
        raise unavailable(f"apt-get installed {package} but no {binary} binary is on PATH or in /usr/sbin")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass
class Replica:
    """One replica (`python -m app`, as the container starts it) on loopback, its output in `log_path`."""

    port: int
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, env: Mapping[str, str], log_path: Path) -> Replica:
        """Start the service as the container does (`python -m app`), with `env` added to this environment."""
        port = free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", LOOPBACK, "--port", str(port)],
                cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C on the proof reaches the proof, which then stops the replicas itself.
                start_new_session=True,
            )
        return cls(port=port, process=process, log_path=log_path)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until /readyz answers 200; ClusterError with the log's end if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ClusterError(f"replica on port {self.port} exited with {self.process.returncode} "
                                       f"before it was ready; its log ends with:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                # often: the test suite waits for dozens of starts, and a refused connection costs next to nothing
                time.sleep(0.05)
        raise ClusterError(f"replica on port {self.port} was not ready after {timeout_s:.0f} s; "
                           f"its log ends with:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the service drains), then SIGKILL if it is still there after `grace_s`."""
        _stop(self.process, signal.SIGTERM, grace_s)


@dataclass
class RedisServer:
    """A redis-server on loopback, as the compose file runs it for the rate limits: no persistence, so that a
    restart starts empty. `stop()` and `start()` again keep the port, as a restarted container keeps its name."""

    binary: str  # from ensure_redis_server()
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 10.0) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                   "--dir", str(self.workdir)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClusterError(f"redis-server exited with {self.process.returncode}; see {self.log_path}")
            if self.ping():
                return
            time.sleep(0.05)
        raise ClusterError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def ping(self) -> bool:
        """Whether the server answers PING (RESP spoken by hand: the check needs no client library)."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: the store disappears at once, as when its host dies (and there is nothing to save)."""
        if self.process is not None:
            _stop(self.process, signal.SIGKILL, grace_s=5.0)
            self.process = None


@dataclass
class LocalCluster:
    """N replicas (`python -m app`) and one nginx in front, rendered from the compose configuration."""

    nginx_binary: str | None  # from ensure_nginx(); None: the replicas only, no nginx (e.g. bench/)
    model_store: Path
    model_name: str
    replica_count: int = 3
    # torch threads per replica: 3 replicas share this machine's cores instead of each taking all of them.
    threads_per_replica: int = 1
    # Extra settings for every replica (e.g. DRAIN_GRACE_S).
    app_env: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="siamcam-proof-")))
    replicas: list[Replica] = field(default_factory=list)
    nginx: subprocess.Popen | None = None
    lb_port: int = 0

    @property
    def lb_url(self) -> str:
        return f"http://{LOOPBACK}:{self.lb_port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "nginx-access.log"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for index in range(self.replica_count):
            self.replicas.append(self._start_replica(index))
        for replica in self.replicas:
            replica.wait_ready()
        if self.nginx_binary is not None:
            self._start_nginx()

    def _start_replica(self, index: int) -> Replica:
        threads = str(self.threads_per_replica)
        env = {
            "MODEL_STORE": str(self.model_store),
            "MODEL_NAME": self.model_name,
            "DEVICE": "cpu",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            **self.app_env,
        }
        return Replica.start(env, self.workdir / f"replica-{index}.log")

    def _start_nginx(self) -> None:
        self.lb_port = free_port()
        (self.workdir / "siamcam.conf").write_text(
            render_for_loopback([replica.port for replica in self.replicas], self.lb_port))
        # The http {} wrapper the nginx image provides around conf.d/, with every writable path in workdir.
        (self.workdir / "nginx.conf").write_text(f"""\
daemon off;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {self.workdir}/client_body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
    include {self.workdir}/siamcam.conf;
}}
""")
        # As root, nginx's workers run as `nobody` and must reach the temp folders under workdir.
        self.workdir.chmod(0o755)
        command = [self.nginx_binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"),
                   "-e", str(self.workdir / "nginx-error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise ClusterError(f"nginx rejected the rendered config {self.workdir / 'siamcam.conf'}:\n{check.stderr}")
        with self.access_log.open("wb") as log:
            # The template logs requests to stdout, as in the nginx image.
            self.nginx = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                try:
                    if client.get(f"{self.lb_url}/lb/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    time.sleep(0.1)
        raise ClusterError(f"nginx did not answer on port {self.lb_port}; see {self.workdir / 'nginx-error.log'}")

    def close(self) -> None:
        """Stop everything started here: replicas first (SIGTERM, then SIGKILL if they hang), then nginx."""
        for replica in self.replicas:
            replica.stop()
        if self.nginx is not None:
            _stop(self.nginx, signal.SIGQUIT, grace_s=5.0)


def _stop(process: subprocess.Popen, first_signal: signal.Signals, grace_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(first_signal)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        # The process leads its own group (start_new_session): this also ends the children it started.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
