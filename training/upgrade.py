"""`python -m training upgrade`: re-export a model folder in the current contract format, with the same weights.

A model exported by an earlier siamcam (format version 1) is still served, with Grad-CAM only; upgrading it adds
what exact contributions need (format version 2) without retraining. The network is rebuilt from the manifest's
backbone and embedding size, given the file's own weights, checked to score exactly as the old file does, and
exported; everything the manifest says about its training and metrics is kept, since the scores do not change.
A folder already in the current format that lacks the backbone program (contract/compiled.py) gets only that,
made from the same rebuilt network and checked against the file's features; its model.pt is left as it is.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from contract.manifest import (
    FORMAT_VERSION, MANIFEST_FILE, MODEL_FILE, BackboneProgram, Manifest, ManifestError, read_manifest, write_manifest,
)
from contract.torchscript import TorchScriptError, load_torchscript
from training.errors import UsageError
from training.export import EXPORT_TOLERANCE, ExportMismatchError, export_backbone_program, export_model
from training.model import build_siamese

# Filled in again by the export, from the file it writes.
_REWRITTEN_FIELDS = {"format_version", "created_at", "embedding_dim", "feature_map", "torch_version",
                     "torchvision_version", "sha256", "backbone_program"}


def add_upgrade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder holding model.pt and manifest.json")
    parser.add_argument("--output", type=Path, help="where to write the upgraded folder (default: in place)")


def upgrade(args: argparse.Namespace) -> None:
    try:
        manifest = read_manifest(args.model)
        old = load_torchscript(args.model / MODEL_FILE, manifest.format_version)
    except (ManifestError, TorchScriptError) as error:
        raise UsageError(str(error)) from error
    output = args.output or args.model
    net = build_siamese(manifest.backbone, manifest.embedding_dim).eval()
    try:
        net.load_state_dict(old.state_dict())
    except RuntimeError as error:
        raise UsageError(f"{args.model / MODEL_FILE} does not hold a {manifest.backbone} Siamese network with "
                         f"embedding size {manifest.embedding_dim}, as its manifest says; it cannot be upgraded, "
                         "retrain it with `python -m training train`") from error
    _check_same_scores(old, net, manifest.input_size, args.model / MODEL_FILE)
    if manifest.format_version == FORMAT_VERSION:
        _add_backbone_program(args.model, output, net, old, manifest)
        return
    carried = manifest.model_dump(exclude=_REWRITTEN_FIELDS)
    carried["upgraded_from"] = {"format_version": manifest.format_version, "sha256": manifest.sha256,
                                "created_at": manifest.created_at}
    # Written beside the target first: a failed export never leaves a model.pt that its manifest does not match.
    staging = output.with_name(output.name + ".upgrading")
    shutil.rmtree(staging, ignore_errors=True)
    upgraded = export_model(net, staging, carried)
    output.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, *_program_files(upgraded), MANIFEST_FILE):
        (staging / name).replace(output / name)
    staging.rmdir()
    print(f"{output}: format version {manifest.format_version} -> {FORMAT_VERSION}, same scores; model.pt sha256 "
          f"{upgraded.sha256[:12]}...")


def _check_same_scores(old: torch.jit.ScriptModule, net: torch.nn.Module, input_size: tuple[int, int],
                       path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 3, *input_size, generator=generator)
    x2 = torch.randn(4, 3, *input_size, generator=generator)
    with torch.no_grad():
        difference = float((old(x1, x2) - net(x1, x2)).abs().max())
    if not difference < EXPORT_TOLERANCE:
        raise UsageError(f"the network rebuilt from {path} scores differently from it (by {difference:.2e}); it "
                         "cannot be upgraded, retrain it with `python -m training train`")


def _add_backbone_program(source: Path, output: Path, net: torch.nn.Module, old: torch.jit.ScriptModule,
                          manifest: Manifest) -> None:
    if output != source:
        shutil.copytree(source, output, dirs_exist_ok=True)
    if manifest.backbone_program is not None and (output / manifest.backbone_program.file).is_file():
        print(f"{output}: already in format version {FORMAT_VERSION} with its backbone program; nothing to do")
        return
    try:
        entry = export_backbone_program(net, old, output, manifest.input_size)
    except ExportMismatchError as error:
        raise UsageError(str(error)) from error
    if entry is None:
        raise UsageError(f"the network rebuilt from {source / MODEL_FILE} cannot be exported as a backbone program; "
                         "it is served with TorchScript only")
    # The manifest last: a folder whose manifest lists the program always holds it.
    write_manifest(output, manifest.model_copy(update={"backbone_program": BackboneProgram(**entry)}))
    print(f"{output}: backbone program {entry['file']} added (sha256 {entry['sha256'][:12]}...), same features as "
          f"{MODEL_FILE}, which is unchanged")


def _program_files(manifest: Manifest) -> tuple[str, ...]:
    return (manifest.backbone_program.file,) if manifest.backbone_program is not None else ()
