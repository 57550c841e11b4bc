"""Starting the real service for a test or a benchmark: in this process's thread, or as a uvicorn subprocess.

The subprocess launcher is deploy/local_cluster.py's `Replica`, the one the deployment proof uses, so there is
one way to start the service and wait for /readyz.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from app.main import create_app
from app.settings import Settings
from deploy.local_cluster import LOOPBACK, Replica, free_port

__all__ = ["free_port", "running_service", "serve_in_thread"]

STARTUP_TIMEOUT_S = 180  # loading and warming up a model on a busy 2-core machine


@contextmanager
def serve_in_thread(settings: Settings) -> Iterator[str]:
    """The app served by a real uvicorn server on loopback, in this process (quick to start: torch is loaded)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=LOOPBACK, port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start; see the log above")
        time.sleep(0.05)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running_service(env: Mapping[str, str], log_path: Path, wait_ready: bool = True) -> Iterator[Replica]:
    """`python -m app` as the container starts it, with `env` (MODEL_STORE, MODEL_NAME, settings) added to this
    environment; ready unless `wait_ready` is False; stopped (drained, then killed if need be) on exit."""
    replica = Replica.start(env, log_path)
    try:
        if wait_ready:
            replica.wait_ready(STARTUP_TIMEOUT_S)
        yield replica
    finally:
        replica.stop()
