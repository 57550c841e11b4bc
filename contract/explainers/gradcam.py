"""Grad-CAM for Siamese pairs: all four maps of a batch from one backward pass through the model's head.

For a pair (x1, x2) with score s, the factual target is the decided class (s if similar, else 1 - s) and the
counterfactual target the other one. Because d(1 - s)/dA = -ds/dA, the two targets' channel weights are
negatives of each other, so a single gradient of s with respect to both images' feature maps gives
everything: cam = sum_c mean(ds/dA_c) * A_c, factual = ReLU(+-cam), counterfactual = ReLU(-+cam).

The backbone has already run without autograd (`contract.explainers.decide`); only the small head (embed,
similarity) is differentiated, with respect to the detached feature maps. No hooks: the model contract
exposes `features` as a method.
"""

from __future__ import annotations

import torch

from contract.explainers import PairMaps, heatmaps


def explain(model: torch.jit.ScriptModule, feature_maps1: torch.Tensor, feature_maps2: torch.Tensor,
            similar: torch.Tensor, size: torch.Size | tuple[int, int]) -> PairMaps:
    """Grad-CAM maps at `size` (the input size) of the pairs whose feature maps are given; `similar` (bool [N])
    is each pair's decision, the factual target."""
    maps1 = feature_maps1.detach().requires_grad_(True)
    maps2 = feature_maps2.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = model.similarity(model.embed(maps1), model.embed(maps2))
        # Pairs are independent, so the gradient of the sum is each pair's own gradient.
        grads1, grads2 = torch.autograd.grad(scores.sum(), (maps1, maps2))
    return heatmaps(_weighted_sum(maps1.detach(), grads1), _weighted_sum(maps2.detach(), grads2), similar, size)


def _weighted_sum(feature_maps: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    return (channel_weights * feature_maps).sum(dim=1)
