"""Faithfulness of the explanations, measured: deletion and insertion curves (Petsiuk et al., "RISE", 2018).

For each pair, image 1's feature-map cells are ranked by an explanation of the pair's decision, most important
first: Grad-CAM's, the exact contributions', and a random order as the baseline. Deletion replaces the cells of
image 1, in that order, by the image's mean colour, one cell more at each step, tracking the probability of the
decided class (the score if the pair was decided similar, else 1 - score); insertion starts from image 1 in its
mean colour and puts the cells back in the same order. A faithful ranking makes the deletion curve fall fast
(small area) and the insertion curve rise fast (large area). Areas are taken over the fraction of cells, so
they lie in [0, 1]; they are averaged over the pairs.

The explanations come from the contract's explainers (contract/explainers/), the very code the service runs,
at the feature-map grid's resolution; a cell is the block of input pixels that the stretch resize policy maps
it onto.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from contract.explainers import PairMaps, cell_box, contributions, decide, gradcam
from contract.manifest import Manifest

ORDERS: tuple[str, ...] = ("gradcam", "contributions", "random")
CURVES: tuple[str, ...] = ("deletion", "insertion")


def cell_masks(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """bool [P, H, W]: the input pixels of each cell, row-major, for an input of `size` ([height, width])."""
    height, width = size
    masks = torch.zeros(grid[0] * grid[1], height, width, dtype=torch.bool)
    for row in range(grid[0]):
        for col in range(grid[1]):
            x0, y0, x1, y1 = cell_box(row, col, grid, (width, height))
            masks[row * grid[1] + col, y0:y1, x0:x1] = True
    return masks


def _ranking(maps: PairMaps) -> torch.Tensor:
    """Image 1's cells [N, P], most important first: those supporting the decision by how much, then those
    against it, least first (the factual and counterfactual maps are never both positive on one cell)."""
    importance = (maps.factual1 - maps.counterfactual1).flatten(1)
    return importance.argsort(dim=1, descending=True, stable=True)


def cell_orders(model: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor, threshold: float,
                threshold_raw_logit: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each pair's decision (bool [N]) and, per order in ORDERS, image 1's cells [N, P] most important first."""
    decided = decide(model, x1, x2, threshold)
    grid = tuple(decided.feature_maps1.shape[-2:])
    explained = {
        "gradcam": gradcam.explain(model, decided.feature_maps1, decided.feature_maps2, decided.similar, grid),
        "contributions": contributions.explain(model, decided.feature_maps1, decided.feature_maps2,
                                               decided.similar, threshold_raw_logit, grid).maps,
    }
    orders = {name: _ranking(maps) for name, maps in explained.items()}
    cells = grid[0] * grid[1]
    orders["random"] = torch.stack([torch.randperm(cells, generator=generator) for _ in range(x1.shape[0])])
    return decided.similar, orders


def curves(model: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor, similar: torch.Tensor,
           order: torch.Tensor, masks: torch.Tensor, curve: str) -> torch.Tensor:
    """The decided class's probability [N, P + 1] after 0..P steps of deletion or insertion in `order`."""
    count, cells = order.shape
    mean_colour = x1.mean(dim=(2, 3), keepdim=True).expand_as(x1)
    with torch.no_grad():
        partner = model.embed(model.features(x2))
        steps = []
        for step in range(cells + 1):
            # [N, H, W]: the pixels of the first `step` cells of each pair's order
            chosen = masks[order[:, :step]].any(dim=1) if step else torch.zeros_like(masks[0]).expand(count, -1, -1)
            chosen = chosen[:, None]
            image = torch.where(chosen, mean_colour, x1) if curve == "deletion" else torch.where(chosen, x1,
                                                                                                 mean_colour)
            scores = model.similarity(model.embed(model.features(image)), partner)
            steps.append(torch.where(similar, scores, 1 - scores))
    return torch.stack(steps, dim=1)


def area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area [N] under curves [N, P + 1] sampled at the fractions 0, 1/P, ..., 1 of the cells."""
    cells = curve.shape[1] - 1
    return (curve.sum(dim=1) - (curve[:, 0] + curve[:, -1]) / 2) / cells


def measure(model: torch.jit.ScriptModule, manifest: Manifest, threshold_raw_logit: float,
            x1_batches: list[torch.Tensor], x2_batches: list[torch.Tensor], seed: int) -> dict[str, Any]:
    """Mean deletion and insertion areas of each order over the pairs of the given batches of model inputs, and
    the mean curves."""
    grid = (manifest.feature_map.height, manifest.feature_map.width)
    masks = cell_masks(grid, manifest.input_size)
    generator = torch.Generator().manual_seed(seed)
    measured: dict[str, dict[str, list[torch.Tensor]]] = {curve: {name: [] for name in ORDERS} for curve in CURVES}
    for x1, x2 in zip(x1_batches, x2_batches, strict=True):
        similar, orders = cell_orders(model, x1, x2, manifest.threshold, threshold_raw_logit, generator)
        for curve in CURVES:
            for name, order in orders.items():
                measured[curve][name].append(curves(model, x1, x2, similar, order, masks, curve))
    every = {curve: {name: torch.cat(values) for name, values in by_order.items()}
             for curve, by_order in measured.items()}
    pairs = sum(len(x1) for x1 in x1_batches)
    return {
        "pairs": pairs,
        "grid": list(grid),
        "seed": seed,
        "protocol": "image 1's cells replaced by its mean colour (deletion) or restored (insertion), most "
                    "important first; area under the decided class's probability over the fraction of cells",
        **{curve: {name: round(float(area(values).mean()), 4) for name, values in by_order.items()}
           for curve, by_order in every.items()},
        # the mean curves themselves, at 0, 1/P, ..., 1 of the cells: what the model report draws
        "curves": {curve: {name: [round(float(value), 4) for value in values.mean(dim=0)]
                           for name, values in by_order.items()} for curve, by_order in every.items()},
    }


def spread_subset(count: int, limit: int | None) -> np.ndarray:
    """At most `limit` of `count` positions, evenly spread (pairs come ordered by class)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))
