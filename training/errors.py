"""Errors the user can fix. `python -m training` prints their message without a traceback and exits with status 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A problem with the command or its inputs; the message says what to do next."""
