"""Loading a model from the store (model_store/README.md is the contract) and turning images into its input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as transforms

from app.gradcam import PairExplanations, explain_batch, score_batch
from app.torchscript import load_torchscript, sha256_of

SUPPORTED_FORMAT_VERSION = 1


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says which file is wrong and what to do."""


@dataclass(frozen=True)
class ServedModel:
    module: torch.jit.ScriptModule
    manifest: dict[str, Any]
    device: torch.device

    @property
    def input_size(self) -> tuple[int, int]:
        height, width = self.manifest["input_size"]
        return int(height), int(width)

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @cached_property
    def _transform(self) -> transforms.Compose:
        # `resize_policy: stretch`: the whole image, no crop, so every heatmap pixel maps back onto the original.
        normalization = self.manifest["normalization"]
        return transforms.Compose([
            transforms.PILToTensor(),
            transforms.Resize(self.input_size, antialias=True),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(normalization["mean"], normalization["std"]),
        ])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image as the normalized float tensor [3, H, W] the model expects (on the CPU)."""
        return self._transform(image)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={requested} but no CUDA device is visible; set DEVICE=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(f"DEVICE={requested} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def read_manifest(model_dir: Path) -> dict[str, Any]:
    manifest_path = model_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ModelLoadError(
            f"no model at {model_dir} ({manifest_path.name} is missing): set MODEL_STORE and MODEL_NAME to a "
            "folder holding model.pt and manifest.json, or train one with `python -m training train`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{manifest_path} is not readable JSON ({error}); re-export the model") from error
    if manifest.get("format_version") != SUPPORTED_FORMAT_VERSION:
        raise ModelLoadError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this service reads "
            f"version {SUPPORTED_FORMAT_VERSION}"
        )
    return manifest


def load_model(model_dir: Path, device: str) -> ServedModel:
    """The model in `model_dir` on the chosen device, after checking the file against its manifest."""
    manifest = read_manifest(model_dir)
    model_path = model_dir / "model.pt"
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path} is missing; re-export the model")
    actual = sha256_of(model_path)
    if actual != manifest.get("sha256"):
        raise ModelLoadError(
            f"{model_path} does not match its manifest (sha256 {actual[:12]}..., manifest says "
            f"{str(manifest.get('sha256'))[:12]}...): the file is corrupt or was replaced; re-export the model"
        )
    chosen = pick_device(device)
    try:
        module = load_torchscript(model_path, chosen)
    except RuntimeError as error:
        raise ModelLoadError(f"{model_path} is not a loadable TorchScript model: {error}") from error
    return ServedModel(module=module, manifest=manifest, device=chosen)


def _stack_on(device: torch.device, images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images).to(device, non_blocking=True)


def score_pairs(model: ServedModel, images1: list[torch.Tensor], images2: list[torch.Tensor]) -> list[float]:
    """One batch of /similarity work: the score of each pair."""
    scores = score_batch(model.module, _stack_on(model.device, images1), _stack_on(model.device, images2))
    return scores.cpu().tolist()


def explain_pairs(
    model: ServedModel, images1: list[torch.Tensor], images2: list[torch.Tensor]
) -> list[PairExplanations]:
    """One batch of /explain work: each pair's score, decision and four heatmaps, on the CPU."""
    batch = explain_batch(
        model.module, _stack_on(model.device, images1), _stack_on(model.device, images2), model.threshold
    )
    on_cpu = PairExplanations(*(tensor.cpu() for tensor in batch))
    return [PairExplanations(*(tensor[index] for tensor in on_cpu)) for index in range(len(images1))]


# TorchScript's profiling executor optimises a method only after it has run this many times.
_WARM_UP_RUNS = 3


def _blank(model: ServedModel) -> list[torch.Tensor]:
    return [torch.zeros(3, *model.input_size)]


def warm_up(model: ServedModel) -> None:
    """Run both kinds of batch a few times, so that the first requests do not pay for lazy optimisation."""
    blank = _blank(model)
    for _ in range(_WARM_UP_RUNS):
        score_pairs(model, blank, blank)
        explain_pairs(model, blank, blank)


def score_blank_pair(model: ServedModel) -> list[float]:
    """The warm-up's first batch again: a model that fails on it is broken, whatever it was sent."""
    blank = _blank(model)
    return score_pairs(model, blank, blank)
