"""Measuring each set-up of a benchmark in a process of its own: process-wide settings (glibc's malloc options,
torch's threads) cannot be undone within one, so each set-up starts from a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from deploy.nginx_config import REPO_ROOT


def last_line_of(module: str, setup: str) -> str:
    """The last line `python -m MODULE --setup SETUP` prints (the module's measurement of that set-up)."""
    result = subprocess.run([sys.executable, "-m", module, "--setup", setup], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1]
