"""Where compiled backbones are kept by default (no torch here: every process of the service reads its settings)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/siamcam/compiled` (`~/.cache` by default), or the temporary folder's when the home folder
    is not writable (a container's system user)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if not writable(base):
        base = Path(tempfile.gettempdir())
    return base / "siamcam" / "compiled"


def writable(folder: Path) -> bool:
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    return existing is not None and os.access(existing, os.W_OK)
