"""What an explanation is, as the HTTP side reads it: plain numpy arrays and numbers, no torch.

The explainers (contract/explainers/) compute in torch on the model's device; each pair's result leaves them as
these types, so that a process that only decodes uploads and renders overlays (app/front.py) never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, TypeVar

import numpy as np

Method = Literal["gradcam", "contributions"]
Box = tuple[int, int, int, int]  # [x0, y0, x1, y1] in pixels, x1 and y1 exclusive
Cell = tuple[int, int]  # (row, col) in the feature-map grid
Array = TypeVar("Array")  # a torch tensor inside the explainers, a numpy array once a pair's result leaves them


class PairMaps(NamedTuple, Generic[Array]):
    """The four maps of a pair ([H, W]) or of a batch ([N, H, W]) at the model's input size, each in [0, 1]:
    divided by its maximum, or all zeros where no region supports its target (never NaN)."""

    factual1: Array
    factual2: Array
    counterfactual1: Array
    counterfactual2: Array


class Match(NamedTuple):
    """A pair of cells, one per image, and what they contribute together to the raw logit."""

    cell1: Cell
    cell2: Cell
    contribution: float  # M[i, j], in logit units
    share: float  # of the positive total of M (0 when no pair of cells contributes positively)


class ImageTotals(NamedTuple):
    """An image's threshold-relative contributions summed, in logit units: positive + negative == raw - t."""

    positive: float
    negative: float  # <= 0


@dataclass(frozen=True)
class PairContributions:
    """One pair's exact decomposition (contract/explainers/contributions.py)."""

    raw_logit: float
    offset: float
    threshold_raw_logit: float
    correspondence: np.ndarray  # M [h*w, h*w] float32: rows are image 1's cells, columns image 2's, row-major
    relative1: np.ndarray  # [h, w]: image 1's threshold-relative contributions, summing to raw - t
    relative2: np.ndarray  # [h, w]: image 2's

    @property
    def grid(self) -> tuple[int, int]:
        return (self.relative1.shape[0], self.relative1.shape[1])

    @property
    def positive_total(self) -> float:
        """The sum of M's positive entries: all the evidence for "similar"."""
        return float(np.clip(self.correspondence, 0, None).sum())

    def totals(self, image: int) -> ImageTotals:
        """The sums of the positive and of the negative threshold-relative contributions of image 1 or 2."""
        relative = self.relative1 if image == 1 else self.relative2
        return ImageTotals(float(np.clip(relative, 0, None).sum()), float(np.clip(relative, None, 0).sum()))

    def top_matches(self, count: int) -> list[Match]:
        """The `count` pairs of cells with the largest M[i, j], largest first."""
        flat = self.correspondence.ravel()
        largest = np.argsort(-flat, kind="stable")[:count]
        positive_total = self.positive_total
        columns = self.grid[1]
        cells = self.correspondence.shape[1]
        return [
            Match(divmod(int(index) // cells, columns), divmod(int(index) % cells, columns), float(flat[index]),
                  float(flat[index]) / positive_total if positive_total > 0 else 0.0)
            for index in largest
        ]


@dataclass(frozen=True)
class PairExplanation:
    """One pair's result of a batch of /explain work."""

    score: float
    similar: bool  # the decision: the factual maps explain "similar" where True, "dissimilar" elsewhere
    maps: PairMaps[np.ndarray]  # each [H, W] float32 at the model's input size
    contributions: PairContributions | None  # with method=contributions


def cell_box(row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> Box:
    """The pixels of an image of `size` (width, height) that feature-map cell (row, col) of a `grid` (h, w)
    covers under the stretch resize policy: the grid spans the whole image, so the boxes of all cells tile it."""
    (rows, cols), (width, height) = grid, size
    return (round(col * width / cols), round(row * height / rows),
            round((col + 1) * width / cols), round((row + 1) * height / rows))
