"""Export a trained SiameseNet as TorchScript plus manifest.json (the contract in contract/ and model_store/README.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision

from contract.manifest import MODEL_FILE, Manifest, write_manifest
from contract.torchscript import load_torchscript, save_torchscript, sha256_of
from training.model import SiameseNet

# The reloaded file must reproduce the eager model this closely, or no manifest is written.
EXPORT_TOLERANCE = 1e-5


class ExportMismatchError(RuntimeError):
    pass


def _check_reproduces(eager: SiameseNet, scripted: torch.jit.ScriptModule, input_size: tuple[int, int]) -> float:
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 3, *input_size, generator=generator)
    x2 = torch.randn(4, 3, *input_size, generator=generator)
    with torch.no_grad():
        pairs = [
            (eager.features(x1), scripted.features(x1)),
            (eager.embed(eager.features(x1)), scripted.embed(scripted.features(x1))),
            (eager(x1, x2), scripted(x1, x2)),
        ]
    worst = max(float((a - b).abs().max()) for a, b in pairs)
    if worst >= EXPORT_TOLERANCE:
        raise ExportMismatchError(
            f"the saved TorchScript differs from the trained model by {worst:.2e} (limit {EXPORT_TOLERANCE}); "
            "nothing was exported: check for custom ops or data-dependent control flow in the model"
        )
    return worst


def export_model(model: SiameseNet, out_dir: Path, manifest: dict[str, Any]) -> Manifest:
    """Write out_dir/model.pt and out_dir/manifest.json; return the manifest.

    ``manifest`` carries what only the caller knows (name, version, backbone, input_size, resize_policy,
    normalization, threshold, metrics, dataset, training); this adds what the file itself tells. The result is
    validated as the service will validate it, before anything is written beside model.pt.
    """
    model = model.eval().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    save_torchscript(model, model_path)
    input_size = tuple(manifest["input_size"])
    _check_reproduces(model, load_torchscript(model_path), input_size)
    with torch.no_grad():
        _, channels, height, width = model.features(torch.zeros(1, 3, *input_size)).shape
    full = Manifest.model_validate({
        **manifest,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedding_dim": model.embedding_dim,
        "feature_map": {"channels": channels, "height": height, "width": width},
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "sha256": sha256_of(model_path),
    })
    write_manifest(out_dir, full)
    return full
