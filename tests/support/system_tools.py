"""Tests that need a system program (Chromium, nginx, redis-server, g++): they skip where it is missing, except in CI.

`make test` installs them as root (`make system-deps`), and CI runs it with CI=true: there a missing program means
the installation failed, and a suite that skipped its browser or load-balancer tests must not pass as green.
"""

from __future__ import annotations

import os

import pytest


def running_in_ci() -> bool:
    """CI=true (or 1, yes), as GitHub Actions, GitLab CI and .ci/run set it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_system_tool(reason: str) -> None:
    """Skip the test, saying `reason`; in CI, fail it instead."""
    if running_in_ci():
        pytest.fail(f"{reason} (CI=true: `make test` as root installs it, so its absence is a failure)",
                    pytrace=False)
    pytest.skip(reason)
