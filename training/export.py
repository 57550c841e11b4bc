"""Export a trained SiameseNet as TorchScript plus manifest.json (the contract: contract/, model_store/README.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sys

import torch
import torchvision

from contract.compiled import BACKBONE_PROGRAM_FILE, CompileError, export_backbone, run_program
from contract.explainers import contributions
from contract.manifest import FORMAT_VERSION, MODEL_FILE, Manifest, write_manifest
from contract.torchscript import load_torchscript, save_torchscript, sha256_of
from training.model import SiameseNet

# The reloaded file must reproduce the eager model this closely, or no manifest is written.
EXPORT_TOLERANCE = 1e-5
# ... and its raw logit must be the sum of its contributions to this relative precision (float32 sums).
CONTRIBUTIONS_TOLERANCE = 1e-4


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


def _check_contributions(scripted: torch.jit.ScriptModule, input_size: tuple[int, int]) -> float:
    """The format-version-2 methods decompose the file's own score exactly: embed_cells sums to embed, the
    correspondence matrix plus the offset to the raw logit, and the raw logit maps to the score and back."""
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, 3, *input_size, generator=generator)
    x2 = torch.randn(4, 3, *input_size, generator=generator)
    with torch.no_grad():
        f1, f2 = scripted.features(x1), scripted.features(x2)
        scores = scripted.similarity(scripted.embed(f1), scripted.embed(f2))
        found = contributions.explain(scripted, f1, f2, scores >= 0.5, 0.0, input_size)
        embedding = scripted.embed(f1)
        errors = {
            "sum of embed_cells vs embed": float((scripted.embed_cells(f1).sum(dim=(1, 2)) - embedding).abs().max()
                                                 / embedding.abs().max()),
            "sum of contributions + offset vs raw_logit": float(
                ((found.correspondence.sum(dim=(1, 2)) + found.offset - found.raw_logits).abs()
                 / found.raw_logits.abs().clamp(min=1.0)).max()),
            "score_of_raw(raw_logit) vs similarity": float((scripted.score_of_raw(found.raw_logits) - scores)
                                                           .abs().max()),
            "raw_of_score(score_of_raw(r)) vs r": float(
                (scripted.raw_of_score(scripted.score_of_raw(found.raw_logits.double())) - found.raw_logits)
                .abs().max() / found.raw_logits.abs().clamp(min=1.0).max()),
        }
    name, worst = max(errors.items(), key=lambda item: item[1])
    if not worst < CONTRIBUTIONS_TOLERANCE:
        raise ExportMismatchError(
            f"the saved model's contributions are not exact ({name}: relative error {worst:.2e}, limit "
            f"{CONTRIBUTIONS_TOLERANCE}); nothing was exported: check that the projection is an affine map of the "
            "average-pooled features and that the model is in eval mode"
        )
    return worst


def export_backbone_program(model: SiameseNet, scripted: torch.jit.ScriptModule, out_dir: Path,
                            input_size: tuple[int, int]) -> dict[str, str] | None:
    """Write out_dir/backbone.pt2, `features` as a program the serving machine compiles for itself
    (contract/compiled.py), checked to compute the TorchScript file's feature maps; its manifest entry. A model
    whose features cannot be exported gets none, and is served with TorchScript alone."""
    path = out_dir / BACKBONE_PROGRAM_FILE
    try:
        export_backbone(model, input_size, path)
    except CompileError as error:
        path.unlink(missing_ok=True)
        print(f"note: {error}; the model will be served with TorchScript only", file=sys.stderr)
        return None
    x = torch.randn(3, 3, *input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = float((run_program(path, x) - scripted.features(x)).abs().max())
    if not difference < EXPORT_TOLERANCE:
        path.unlink()
        raise ExportMismatchError(f"the exported backbone program differs from the TorchScript file's features by "
                                  f"{difference:.2e} (limit {EXPORT_TOLERANCE}); nothing was exported")
    return {"file": BACKBONE_PROGRAM_FILE, "sha256": sha256_of(path)}


def export_model(model: SiameseNet, out_dir: Path, manifest: dict[str, Any]) -> Manifest:
    """Write out_dir/model.pt, out_dir/backbone.pt2 and out_dir/manifest.json; return the manifest.

    ``manifest`` carries what only the caller knows (name, version, backbone, input_size, resize_policy,
    normalization, threshold, metrics, dataset, training); this adds what the file itself tells. The result is
    validated as the service will validate it, before anything is written beside model.pt.
    """
    model = model.eval().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    save_torchscript(model, model_path)
    input_size = tuple(manifest["input_size"])
    scripted = load_torchscript(model_path, FORMAT_VERSION)
    _check_reproduces(model, scripted, input_size)
    _check_contributions(scripted, input_size)
    with torch.no_grad():
        _, channels, height, width = model.features(torch.zeros(1, 3, *input_size)).shape
    full = Manifest.model_validate({
        **manifest,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedding_dim": model.embedding_dim,
        "feature_map": {"channels": channels, "height": height, "width": width},
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "sha256": sha256_of(model_path),
        "backbone_program": export_backbone_program(model, scripted, out_dir, input_size),
    })
    write_manifest(out_dir, full)
    return full
