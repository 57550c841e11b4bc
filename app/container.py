"""The container's processes with HTTP_WORKERS > 0 (`python -m app`, app/__main__.py): this, the main process,
owns the model (app/model_owner.py) and serves it (app/owner_server.py) to HTTP_WORKERS front processes, each
`uvicorn app.main:app` on its own listening socket of the port (bound here), which do every request's own work:
keys, rate limits, admission, parsing, decoding, rendering. Their batches form here, from all of them at once.

One service to operate: metrics of every process are summed (app/metrics.py), and so are the rate limits counted
in memory and the budget of pixels being decoded (app/admission.py); a front that dies is started again, unless
it exits by itself before it ever reached the owner (a start-up error: the container exits with its status); if the model
cannot be run, everything stops with status 1; SIGTERM (or SIGINT) drains the fronts first, then the model's
owner leaves, with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from prometheus_client import multiprocess

from app.admission import forget_front_pixels, pixel_counters
from app.model_owner import running_model_owner
from app.model_view import ModelLoadError
from app.owner_server import OwnerServer
from app.ratelimit import RateLimiter
from app.settings import Settings

logger = logging.getLogger(__name__)
EXIT_MODEL_UNAVAILABLE = 1
# After SIGTERM, the fronts drain within DRAIN_GRACE_S; beyond this much more, they are killed.
FRONT_EXIT_MARGIN_S = 10.0


class Fronts:
    """The front processes: started, watched, started again when one dies after it has reached the owner."""

    def __init__(self, listeners: Sequence[socket.socket], owner_socket: Path, uvicorn_options: Sequence[str],
                 stop: asyncio.Future[int]) -> None:
        self._listeners = listeners  # one per front: a front started again takes its predecessor's, and its index
        self._uvicorn_options = list(uvicorn_options)
        self._pixel_counters = pixel_counters(len(listeners))
        self._environment = {**os.environ, "OWNER_SOCKET": str(owner_socket),
                             "PIXEL_COUNTERS_FD": str(self._pixel_counters)}
        self._stop = stop
        self.greeted: set[int] = set()  # the fronts that have reached the owner
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self.stopping = False

    async def start_all(self) -> None:
        for index in range(len(self._listeners)):
            await self._start(index)

    async def _start(self, index: int) -> None:
        listener = self._listeners[index].fileno()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(listener), *self._uvicorn_options,
            pass_fds=(listener, self._pixel_counters), env={**self._environment, "FRONT_INDEX": str(index)})
        self.processes[process.pid] = process
        watcher = asyncio.create_task(self._watch(process, index))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, process: asyncio.subprocess.Process, index: int) -> None:
        status = await process.wait()
        del self.processes[process.pid]
        multiprocess.mark_process_dead(process.pid)  # its live gauges no longer count
        forget_front_pixels(self._pixel_counters, index)
        if self.stopping or self._stop.done():
            return
        if process.pid not in self.greeted and status > 0:  # not killed by a signal: it could not start
            logger.critical(f"a front process exited with status {status} before it reached the model owner: "
                            "the container stops (its own log lines above say why)")
            self._stop.set_result(status)
            return
        logger.warning(f"front process {process.pid} exited with status {status}; starting another")
        await self._start(index)

    def signal_all(self, signum: int) -> None:
        for process in self.processes.values():
            process.send_signal(signum)

    async def wait_all(self, timeout_s: float) -> None:
        """Until every front has exited; past `timeout_s`, they are killed."""
        processes = list(self.processes.values())
        try:
            async with asyncio.timeout(timeout_s):
                for process in processes:
                    await process.wait()
        except TimeoutError:
            logger.error("front processes still running after their grace period: killed")
            self.signal_all(signal.SIGKILL)


def _worker_stopped(stop: asyncio.Future[int], reason: BaseException | None) -> None:
    logger.critical("the inference worker stopped: this replica answers 503 and exits with status "
                    f"{EXIT_MODEL_UNAVAILABLE} to be restarted", exc_info=reason)
    if not stop.done():
        stop.set_result(EXIT_MODEL_UNAVAILABLE)


def front_listener(host: str, port: int) -> socket.socket:
    """One front's own listening socket on the port (SO_REUSEPORT): the kernel spreads new connections evenly over
    the fronts' sockets. With one socket shared by all, the front that woke first accepted nearly every connection
    waiting (30 of wrk's 32 on one of two fronts), while the other idled."""
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048, reuse_port=True)
    listener.set_inheritable(True)
    # uvicorn wraps an inherited --fd as an AF_UNIX socket, so asyncio never sets TCP_NODELAY on the connections
    # it accepts: Nagle's algorithm and delayed ACKs then held each answer about 40 ms. Accepted sockets inherit
    # the option from the listening one (Linux).
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


async def serve(settings: Settings, host: str, port: int, uvicorn_options: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()  # the exit status, once the container is to stop
    owner_ready: asyncio.Future[object] = loop.create_future()
    listeners = [front_listener(host, port) for _ in range(settings.http_workers)]
    runtime_dir = Path(tempfile.mkdtemp(prefix="siamcam-"))
    # Limits counted in memory are counted here, once for every front (app/owner_client.py, OwnerRateLimits).
    shared_limits = (RateLimiter(settings.rate_limit_bucket_size, settings.rate_limit_window_s,
                                 settings.rate_limit_storage)
                     if settings.rate_limit_per_s is not None and settings.rate_limit_counts_in_memory else None)
    fronts = Fronts(listeners, runtime_dir / "owner.sock", uvicorn_options, stop)
    server = await OwnerServer(owner_ready, shared_limits, fronts.greeted.add).start(runtime_dir / "owner.sock")
    draining = False

    def on_signal(signum: int) -> None:
        nonlocal draining
        fronts.stopping = True
        fronts.signal_all(signum)  # a second signal ends their grace period at once
        if not draining:
            draining = True
            # The fronts' own copies stay open until each stops accepting: then the kernel sends no new connection
            # to a front that is draining.
            for listener in listeners:
                listener.close()
            logger.info(f"draining {len(fronts.processes)} front processes, then stopping")
            waited = asyncio.ensure_future(fronts.wait_all(settings.drain_grace_s + FRONT_EXIT_MARGIN_S))
            waited.add_done_callback(lambda _: stop.done() or stop.set_result(0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await fronts.start_all()  # they start while the model loads
        try:
            async with running_model_owner(settings) as owner:
                owner_ready.set_result(owner)
                owner.on_stop(partial(_worker_stopped, stop))
                logger.info("model owner ready", extra={"fronts": settings.http_workers, "device": owner.view.device,
                                                        "backbone": owner.view.backbone})
                status = await stop
        except ModelLoadError as error:
            logger.critical(f"cannot start: {error}")
            status = EXIT_MODEL_UNAVAILABLE
        if status != 0 and not draining:
            fronts.stopping = True
            # Fronts that were served drain (their waiting requests get 503); the others wait for a model that
            # will not come.
            fronts.signal_all(signal.SIGTERM if owner_ready.done() else signal.SIGKILL)
        await fronts.wait_all(settings.drain_grace_s + FRONT_EXIT_MARGIN_S)
        return status
    finally:
        server.close()
        for listener in listeners:
            listener.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
