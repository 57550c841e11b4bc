"""Fixtures for the service tests: the real app on the real small model, served over real HTTP on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from tests.app.failing_model import export_failing_model

STARTUP_TIMEOUT_S = 120
TEST_MODEL_NAME = "tiny"  # the model that tests/conftest.py's `model_store` fixture exports


@pytest.fixture(scope="session")
def test_settings(model_store: Path) -> Callable[..., Settings]:
    """Settings for the suite's `tiny` model; keyword arguments override any setting, the model's too."""

    def make(**overrides: object) -> Settings:
        return Settings(**{"model_store": model_store, "model_name": TEST_MODEL_NAME, **overrides})

    return make


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _uvicorn_in_thread(settings: Settings) -> Iterator[str]:
    """The app served by a real uvicorn server on loopback, in this process (quick to start: torch is loaded)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start; see the log above")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve(test_settings: Callable[..., Settings]) -> Callable[..., AbstractContextManager[str]]:
    """`with serve(QUEUE_CAPACITY=...) as url:` a service with those settings, for one test."""

    def start(**overrides: object) -> AbstractContextManager[str]:
        return _uvicorn_in_thread(test_settings(**{key.lower(): value for key, value in overrides.items()}))

    return start


@pytest.fixture(scope="session")
def failing_model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding tests/app/failing_model.py's model, named FAILING_MODEL_NAME."""
    return export_failing_model(tmp_path_factory.mktemp("failing_model_store"))


@pytest.fixture(scope="session")
def service_url(serve: Callable[..., AbstractContextManager[str]]) -> Iterator[str]:
    """One service with the default settings (but a short batch window), shared by the tests that need no other."""
    with serve(max_batch_wait_ms=10) as url:
        yield url


@pytest.fixture
def client(service_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_url, timeout=120, trust_env=False) as http:
        yield http
