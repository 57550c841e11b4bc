"""The served model as the HTTP side sees it: its manifest and what it can do, and how an upload becomes its
input picture. No torch here: front processes, which hold no model, import this."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from contract.explanation import Method
from contract.manifest import Manifest
from contract.picture import model_picture
from contract.precision import Precision


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says which file is wrong and what to do."""


@dataclass(frozen=True)
class ScoringConstants:
    """What a client needs to score two embeddings itself, exactly as the model does (format version 2):
    ``score = sigmoid(squash(pair_weight * <e1, e2> + offset))`` with
    ``squash(r) = r / sqrt(1 + (r / max_logit)^2)``."""

    pair_weight: float
    offset: float
    max_logit: float
    threshold: float
    threshold_dot_product: float | None  # <e1, e2> at which the score equals the threshold (None: unreachable)


class ManifestFacts:
    """What a served model's manifest says that both sides ask for (ModelView here, app/model.py's ServedModel)."""

    manifest: Manifest

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.input_size

    @property
    def threshold(self) -> float:
        return self.manifest.threshold


@dataclass(frozen=True)
class ModelView(ManifestFacts):
    manifest: Manifest
    methods: tuple[Method, ...]
    contributions_refusal: str | None  # why method=contributions cannot be served by this model (None: it can)
    device: str  # where the model runs: "cpu", "cuda:0"
    backbone: str  # what computes the feature maps: "compiled" or "torchscript"
    precision: Precision  # what the backbone computes in
    embedding_scoring: ScoringConstants | None  # None for a format-version-1 model

    def picture(self, source: bytes, name: str, max_pixels: int | None) -> np.ndarray:
        """An image file as the uint8 picture [3, H, W] at the model's input size, decoded only as large as that
        needs, through the contract function training evaluates with (without torch); the owner normalizes a batch
        at a time."""
        return model_picture(source, name, max_pixels, self.input_size).transpose(2, 0, 1)

    def to_message(self) -> dict[str, Any]:
        """The view as JSON, sent by the model owner to each front process."""
        return {**asdict(self), "manifest": self.manifest.model_dump(mode="json")}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ModelView:
        scoring = message["embedding_scoring"]
        return cls(manifest=Manifest.model_validate(message["manifest"]), methods=tuple(message["methods"]),
                   contributions_refusal=message["contributions_refusal"], device=message["device"],
                   backbone=message["backbone"], precision=message["precision"],
                   embedding_scoring=None if scoring is None else ScoringConstants(**scoring))
