"""Grad-CAM for Siamese pairs: all four maps of a batch from one forward and one backward pass.

For a pair (x1, x2) with score s, the factual target is the decided class (s if similar, else 1 - s) and the
counterfactual target the other one. Because d(1 - s)/dA = -ds/dA, the two targets' channel weights are
negatives of each other, so a single gradient of s with respect to both images' feature maps gives
everything: cam = sum_c mean(ds/dA_c) * A_c, factual = ReLU(+-cam), counterfactual = ReLU(-+cam).

The backbone runs without autograd; only the small head (embed, similarity) is differentiated, with respect
to the detached feature maps. No hooks: the model contract exposes `features` as a method.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairExplanations(NamedTuple):
    """Per pair: the score, and the four maps [N, H, W] at the model's input size, each in [0, 1]."""

    scores: torch.Tensor
    factual1: torch.Tensor
    factual2: torch.Tensor
    counterfactual1: torch.Tensor
    counterfactual2: torch.Tensor
    similar: torch.Tensor  # bool [N]: the factual target is "similar" where True, "dissimilar" elsewhere


def score_batch(model: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Scores [N] of the pairs (x1[i], x2[i])."""
    with torch.inference_mode():
        return model(x1, x2)


def explain_batch(
    model: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor, threshold: float
) -> PairExplanations:
    """Scores and Grad-CAM maps for the pairs (x1[i], x2[i]); `threshold` decides each pair's class."""
    count = x1.shape[0]
    with torch.no_grad():
        feature_maps = model.features(torch.cat([x1, x2]))
    maps1 = feature_maps[:count].detach().requires_grad_(True)
    maps2 = feature_maps[count:].detach().requires_grad_(True)
    with torch.enable_grad():
        scores = model.similarity(model.embed(maps1), model.embed(maps2))
        # Pairs are independent, so the gradient of the sum is each pair's own gradient.
        grads1, grads2 = torch.autograd.grad(scores.sum(), (maps1, maps2))
    scores = scores.detach()
    similar = scores >= threshold
    sign = torch.where(similar, 1.0, -1.0).to(scores.dtype)[:, None, None]
    cams = torch.stack([
        sign * _weighted_sum(maps1.detach(), grads1),
        sign * _weighted_sum(maps2.detach(), grads2),
    ])  # [2, N, h, w]: the factual target's map before ReLU; the counterfactual one is its negation
    maps = _to_heatmaps(torch.cat([cams, -cams]), x1.shape[-2:])
    return PairExplanations(scores, maps[0], maps[1], maps[2], maps[3], similar)


def _weighted_sum(feature_maps: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    return (channel_weights * feature_maps).sum(dim=1)


def _to_heatmaps(cams: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """ReLU, bilinear upsampling to `size`, each map divided by its maximum; all-zero maps stay zero."""
    positive = F.relu(cams)
    upsampled = F.interpolate(positive.flatten(0, 1)[:, None], size=tuple(size), mode="bilinear",
                              align_corners=False)[:, 0].unflatten(0, cams.shape[:2])
    peaks = upsampled.amax(dim=(-2, -1), keepdim=True)
    # A map with no positive evidence has peak 0: divide by 1 instead, leaving it all zeros (never NaN).
    return upsampled / torch.where(peaks > 0, peaks, torch.ones_like(peaks))

