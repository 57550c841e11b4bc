"""Fixtures for the service tests: the real app on the real small model, served over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.app.failing_model import export_failing_model
from tests.support.service import serve_in_thread

TEST_MODEL_NAME = "tiny"  # the model that tests/conftest.py's `model_store` fixture exports
# The process layouts of `python -m app` (app/container.py), as the environment that picks each.
LAYOUTS = {"one process": {"HTTP_WORKERS": "0"}, "two fronts": {"HTTP_WORKERS": "2"}}


@pytest.fixture(scope="session")
def test_settings(model_store: Path) -> Callable[..., Settings]:
    """Settings for the suite's `tiny` model; keyword arguments override any setting, the model's too."""

    def make(**overrides: object) -> Settings:
        return Settings(**{"model_store": model_store, "model_name": TEST_MODEL_NAME, **overrides})

    return make


@pytest.fixture(scope="session")
def serve(test_settings: Callable[..., Settings]) -> Callable[..., AbstractContextManager[str]]:
    """`with serve(QUEUE_CAPACITY=...) as url:` a service with those settings, for one test."""

    def start(**overrides: object) -> AbstractContextManager[str]:
        return serve_in_thread(test_settings(**{key.lower(): value for key, value in overrides.items()}))

    return start


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of one process layout, then of the other: a test taking it runs in both."""
    return LAYOUTS[request.param]


@pytest.fixture(scope="session")
def failing_model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding tests/app/failing_model.py's model, named FAILING_MODEL_NAME."""
    return export_failing_model(tmp_path_factory.mktemp("failing_model_store"))


@pytest.fixture(scope="session")
def service_url(serve: Callable[..., AbstractContextManager[str]]) -> Iterator[str]:
    """One service with the default settings, shared by the tests that need no other."""
    with serve() as url:
        yield url


@pytest.fixture
def client(service_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_url, timeout=120, trust_env=False) as http:
        yield http
