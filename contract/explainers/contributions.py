"""Exact contributions: the raw logit of a pair as a sum over pairs of feature-map cells (format version 2).

The score is ``score_of_raw(raw)``, a monotonic squash and sigmoid of the raw logit
``raw = pair_weight * <e1, e2> + offset``, and each embedding is a sum of its cells' shares,
``e = sum_i u(i)`` (``u = embed_cells(f)``: the projection's affine map applied to each cell, divided by the
number of cells P). So, with nothing approximated,

    raw = sum_ij M[i, j] + offset,    M[i, j] = pair_weight * <u1(i), u2(j)>,

M[i, j] being how much cell i of image 1 and cell j of image 2 together move the logit: the correspondence
matrix. Summed over j, M gives image 1's per-cell contributions m1(i); over i, image 2's m2(j). Measured
against the decision boundary instead of zero, with the offset and the threshold's raw logit t shared evenly
among the cells, ``m(i) - (t - offset) / P`` sums over each image to ``raw - t``: the factual map is its part
pushing toward the decision, the counterfactual map the part pushing against it. No gradient is taken.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from contract.explainers import PairMaps, heatmaps
from contract.explanation import PairContributions

class Contributions(NamedTuple):
    """A batch's exact decomposition and the maps drawn from it."""

    maps: PairMaps[torch.Tensor]
    correspondence: torch.Tensor  # [N, h*w, h*w]
    raw_logits: torch.Tensor  # [N]: the model's own raw logits, whose score_of_raw are the scores
    relative1: torch.Tensor  # [N, h, w]
    relative2: torch.Tensor  # [N, h, w]
    offset: float
    threshold_raw_logit: float

    def pair(self, index: int) -> PairContributions:
        return PairContributions(
            float(self.raw_logits[index]), self.offset, self.threshold_raw_logit,
            self.correspondence[index].cpu().numpy(), self.relative1[index].cpu().numpy(),
            self.relative2[index].cpu().numpy(),
        )


class ThresholdUnreachable(ValueError):
    """No raw logit reaches the threshold: the squash bounds the score away from 0 and 1."""


def threshold_raw_logit(model: torch.jit.ScriptModule, threshold: float) -> float:
    """The raw logit t at which the score equals `threshold`: the exact inverse of the squash and sigmoid."""
    raw = float(model.raw_of_score(torch.tensor(threshold, dtype=torch.float64)))
    if not math.isfinite(raw):
        raise ThresholdUnreachable(
            f"no score reaches the threshold {threshold} (scores stay strictly between "
            f"{float(model.score_of_raw(torch.tensor(-1e30, dtype=torch.float64))):.2e} and "
            f"{float(model.score_of_raw(torch.tensor(1e30, dtype=torch.float64))):.7f})"
        )
    return raw


def explain(model: torch.jit.ScriptModule, feature_maps1: torch.Tensor, feature_maps2: torch.Tensor,
            similar: torch.Tensor, threshold_raw_logit: float, size: torch.Size | tuple[int, int]) -> Contributions:
    """The exact contributions of the pairs whose feature maps [N, C, h, w] are given, and their maps at `size`;
    `similar` (bool [N]) is each pair's decision, `threshold_raw_logit` the model's t."""
    with torch.no_grad():
        cells1, cells2 = model.embed_cells(feature_maps1), model.embed_cells(feature_maps2)
        count, rows, columns, dim = cells1.shape
        shares1, shares2 = cells1.reshape(count, rows * columns, dim), cells2.reshape(count, rows * columns, dim)
        correspondence = model.pair_weight() * torch.bmm(shares1, shares2.transpose(1, 2))
        raw_logits = model.raw_logit(model.embed(feature_maps1), model.embed(feature_maps2))
        offset = float(model.offset())
        boundary_share = (threshold_raw_logit - offset) / (rows * columns)
        relative1 = (correspondence.sum(dim=2) - boundary_share).reshape(count, rows, columns)
        relative2 = (correspondence.sum(dim=1) - boundary_share).reshape(count, rows, columns)
    maps = heatmaps(relative1, relative2, similar, size)
    return Contributions(maps, correspondence, raw_logits, relative1, relative2, offset, threshold_raw_logit)
