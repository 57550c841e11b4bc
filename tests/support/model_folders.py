"""Model folders made from an exported one for a test: the same files under a changed manifest, or another module
(a format-version-1 model among them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
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


class Version1Siamese(nn.Module):
    """A small real network with format version 1's four methods only, as models exported before version 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, kernel_size=32, stride=32), nn.ReLU())
        self.projection = nn.Linear(8, 16)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.jit.export
    def embed(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.projection(feature_maps.mean(dim=(2, 3)))

    @torch.jit.export
    def similarity(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((e1 * e2).sum(dim=1) / 16)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.embed(self.features(x1)), self.embed(self.features(x2)))


def with_version1_module(source: Path, folder: Path, format_version: int = 1) -> None:
    """A copy of the 128 x 128 px model `source` whose model.pt is a Version1Siamese, under a manifest of
    `format_version` (1 as such models were exported; 2 for a mislabelled one)."""
    with_module(source, folder, Version1Siamese().eval(), format_version=format_version,
                feature_map={"channels": 8, "height": 4, "width": 4}, embedding_dim=16)
