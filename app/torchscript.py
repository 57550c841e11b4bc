"""The one place that touches TorchScript files, for the service and for training's export and evaluation."""

from __future__ import annotations

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
