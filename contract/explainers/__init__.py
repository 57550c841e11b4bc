"""Explanations of a pair's score, one module per method, each with one batched, hook-free entry point:

- `gradcam.explain(model, feature_maps1, feature_maps2, similar, size) -> PairMaps`: the paper's Grad-CAM
  (any format version);
- `contributions.explain(model, feature_maps1, feature_maps2, similar, threshold_raw_logit, size)
  -> Contributions`: the raw logit's exact decomposition over pairs of cells (format version 2).

The decision is made once, here (`decide`), from the score and the threshold, and handed to the explainers as
their targets, the way pytorch-grad-cam's `BaseCAM` takes `targets`: the factual maps explain the decided
class, the counterfactual maps the other one. Both methods end in the same display normalisation (`heatmaps`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from contract.backbone import ServedModule, SplitBackbone
from contract.explanation import Box, Method, PairMaps, cell_box

__all__ = ["Box", "Decided", "Method", "PairMaps", "cell_box", "decide", "heatmaps"]


class Decided(NamedTuple):
    """A batch's feature maps [N, C, h, w] (computed without autograd), scores [N] and decisions (bool [N])."""

    feature_maps1: torch.Tensor
    feature_maps2: torch.Tensor
    scores: torch.Tensor
    similar: torch.Tensor


def decide(model: ServedModule, x1: torch.Tensor, x2: torch.Tensor, threshold: float) -> Decided:
    """The feature maps and scores of the pairs (x1[i], x2[i]), and each pair's decision: similar when
    score >= threshold."""
    with torch.no_grad():
        # The backbone passes the model's forward (what /similarity runs) makes: explaining a batch then costs
        # what scoring it costs, plus the explainer's own work, and scores the same.
        if isinstance(model, SplitBackbone):
            maps1, maps2 = model.pair_features(x1, x2)
        else:
            maps1, maps2 = model.features(x1), model.features(x2)
        scores = model.similarity(model.embed(maps1), model.embed(maps2))
    return Decided(maps1, maps2, scores, scores >= threshold)


def heatmaps(evidence1: torch.Tensor, evidence2: torch.Tensor, similar: torch.Tensor,
             size: torch.Size | tuple[int, int]) -> PairMaps[torch.Tensor]:
    """The four display maps from each image's per-cell evidence [N, h, w] for "similar" (positive: pushes the
    score up): the factual map is the evidence for the decided class, the counterfactual map the evidence for
    the other one. ReLU, bilinear upsampling to `size`, each map divided by its maximum."""
    sign = torch.where(similar, 1.0, -1.0).to(evidence1.dtype)[:, None, None]
    factual = torch.stack([sign * evidence1, sign * evidence2])  # [2, N, h, w]
    positive = F.relu(torch.cat([factual, -factual]))
    upsampled = F.interpolate(positive.flatten(0, 1)[:, None], size=tuple(size), mode="bilinear",
                              align_corners=False)[:, 0].unflatten(0, positive.shape[:2])
    peaks = upsampled.amax(dim=(-2, -1), keepdim=True)
    # A map with no positive evidence has peak 0: divide by 1 instead, leaving it all zeros (never NaN).
    maps = upsampled / torch.where(peaks > 0, peaks, torch.ones_like(peaks))
    return PairMaps(maps[0], maps[1], maps[2], maps[3])
