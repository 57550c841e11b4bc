"""Fixtures for the browser tests: the real service in a uvicorn subprocess, headless Chromium, two real images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.conftest import SHARED_DATASETS
from tests.support import service
from tests.support.images import drawn_image
from tests.support.system_tools import missing_system_tool

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_STORE = REPO / "model_store"
DEFAULT_MODEL_NAME = "flowers"
FLOWERS = SHARED_DATASETS / "flowers"
CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, never a downloaded one; these flags keep it from reaching out to the network.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs the tests as root, where Chromium refuses to start with its sandbox
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="session")
def served_model(request: pytest.FixtureRequest) -> tuple[Path, str]:
    """(MODEL_STORE, MODEL_NAME): the bundled default model when it is there, else the suite's small real one.

    The page is meant for the default model, but a checkout without it (while it is being trained, or a
    trimmed clone) still gets a real end-to-end test with ``tests/conftest.py``'s ``tiny`` model.
    """
    if (DEFAULT_MODEL_STORE / DEFAULT_MODEL_NAME / "manifest.json").is_file():
        return DEFAULT_MODEL_STORE, DEFAULT_MODEL_NAME
    store: Path = request.getfixturevalue("model_store")
    return store, "tiny"


@pytest.fixture(scope="session")
def service_url(served_model: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the real service with its default settings."""
    with running_service(*served_model, tmp_path_factory.mktemp("service")) as url:
        yield url


@pytest.fixture(scope="session")
def contributions_service_url(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's small real model, ``tiny``, exported with exact contributions (format version 2), which says
    "similar" and "not similar" to the drawn pairs of tests/conftest.py: one service for every module's tests."""
    with running_service(model_store, "tiny", tmp_path_factory.mktemp("contributions")) as url:
        yield url


@contextmanager
def running_service(store: Path, name: str, log_dir: Path, **settings: str) -> Iterator[str]:
    """The service started with uvicorn on loopback, as a user would start it; ``settings`` are extra env vars."""
    env = {"MODEL_STORE": str(store), "MODEL_NAME": name, **settings}
    with service.running_service(env, log_dir / "uvicorn.log") as replica:
        yield replica.url


# Module scope, not session: Playwright's sync API keeps an event loop running until it stops, and tests
# collected after the browser tests call asyncio.run(), which refuses to start inside a running loop.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        missing_system_tool(f"{CHROMIUM} is missing: install Debian's chromium (`make system-deps` as root) to run "
                            "the browser tests")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A rose and a daisy from the shared flowers dataset when it is present, else two drawn ones (JPEG and PNG)."""
    if FLOWERS.is_dir():
        return sorted((FLOWERS / "Rose").glob("*.jpg"))[0], sorted((FLOWERS / "Daisy").glob("*.jpg"))[0]
    folder = tmp_path_factory.mktemp("images")
    first, second = folder / "first.jpg", folder / "second.png"
    drawn_image(1, (320, 240)).save(first, "JPEG", quality=90)
    drawn_image(2, (320, 240)).save(second, "PNG")
    return first, second


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go for a person to look at: git-ignored, kept after the run."""
    folder = REPO / "test-artifacts" / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
