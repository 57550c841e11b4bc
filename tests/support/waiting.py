"""Polling the service from a test until something it does from the outside has happened."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    """Return once `condition()` holds; fail the test if it still does not after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the service"
        time.sleep(0.05)
