"""The one place that touches TorchScript files, for the service and for training's export and evaluation."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch 2.14 warns that TorchScript is deprecated on every script/load; our users asked for TorchScript,
    and the warning would only clutter their logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def load_torchscript(path: Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    with quiet_torchscript():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in blocks: what manifest.json records for model.pt."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
