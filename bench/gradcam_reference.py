"""pytorch-grad-cam's Grad-CAM of the Siamese model: the reference our maps are tested and benchmarked against."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from app.model import ServedModel
from contract.torchscript import load_torchscript


class ScoreAgainstFixedImage(nn.Module):
    """pytorch-grad-cam's view of the Siamese model: one image in, [dissimilar, similar] out, the other image
    fixed. Its target layer, `features`, outputs exactly the feature maps our Grad-CAM uses."""

    def __init__(self, module: torch.jit.ScriptModule, other_image: torch.Tensor, other_first: bool) -> None:
        super().__init__()
        self.features = _Features(module)
        self.module = module
        with torch.no_grad():
            self.other_embedding = module.embed(module.features(other_image))
        self.other_first = other_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.module.embed(self.features(x))
        pair = (self.other_embedding, embedding) if self.other_first else (embedding, self.other_embedding)
        score = self.module.similarity(*pair)
        return torch.stack([1 - score, score], dim=1)


class _Features(nn.Module):
    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.features(x)


def as_loaded(served: ServedModel) -> torch.jit.ScriptModule:
    """The served model's file as loaded, not frozen for serving: pytorch-grad-cam reads the device off the
    model's parameters, which freezing turns into constants."""
    return load_torchscript(served.path, served.manifest.format_version, served.device)


def pytorch_grad_cam_maps(module: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor, similar: bool
                          ) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's four maps [H, W] for one pair (x1, x2 each [1, 3, H, W]), named as the fields of
    `contract.explainers.PairMaps`; `similar` is the pair's decision, which makes "similar" the factual target."""
    targets = {"factual": int(similar), "counterfactual": int(not similar)}  # class 1 is "similar"
    maps = {}
    for image, this, other, other_first in ((1, x1, x2, False), (2, x2, x1, True)):
        # An exported model's parameters are frozen: unless the input requires grad, nothing in the graph does
        # and pytorch-grad-cam's hook receives no gradient.
        this = this.detach().requires_grad_(True)
        wrapper = ScoreAgainstFixedImage(module, other, other_first)
        with GradCAM(model=wrapper, target_layers=[wrapper.features]) as reference:
            for kind, category in targets.items():
                target = [ClassifierOutputTarget(category)]
                maps[f"{kind}{image}"] = reference(input_tensor=this, targets=target)[0]
    return maps
