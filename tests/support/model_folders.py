"""Model folders made from an exported one for a test: the same files under a changed manifest, or another module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from contract.torchscript import save_torchscript, sha256_of


def copy_of_model(source: Path, folder: Path, **manifest_changes: object) -> dict[str, Any]:
    """A copy of the model folder `source` in `folder`, its manifest's fields changed (None: removed); the
    manifest written."""
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def with_module(source: Path, folder: Path, module: nn.Module, **manifest_changes: object) -> None:
    """A copy of `source` whose model.pt is `module`, scripted, with its manifest's sha256 to match (and these
    fields changed)."""
    manifest = copy_of_model(source, folder, **manifest_changes)
    save_torchscript(module, folder / "model.pt")
    manifest["sha256"] = sha256_of(folder / "model.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
