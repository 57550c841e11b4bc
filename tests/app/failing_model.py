"""A tiny real model that fails on purpose, exported with training's own export: for the failure paths.

Its `features` raises (as TorchScript does: a RuntimeError) for an all-red image, and for every input, the
warm-up pair included, once it has seen an all-blue image, as a device does after a sticky CUDA error. Its
`forward` (the /similarity path) returns one score too many for a batch holding an all-green first image, a
result the batcher cannot hand out. An all-yellow image takes it a second or more of CPU (matrix products it
then discards; as many as this machine needs for BUSY_SECONDS, counted when the model is exported), to keep the
model busy while a test queues pairs behind it. On any other input it is an ordinary, if small and untrained,
Siamese network.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from tests.conftest import IMAGENET_MEAN, IMAGENET_STD
from tests.support.images import encode
from training.export import export_model
from training.model import SiameseNet

FAILING_MODEL_NAME = "failing"
INPUT_SIZE = (32, 32)
# A fixed 150 products an image (300 for the all-yellow pair) took about half a second on a 2-core machine, but on
# a 16-core one the busy batch was over in 0.1 s, before the pairs a test queued behind it could be counted: the
# work is sized to the machine. Per image, so the all-yellow pair keeps the model busy about a second.
BUSY_SECONDS = 0.5
MIN_BUSY_PRODUCTS = 150  # what every machine ran before: never less
_RED, _GREEN, _BLUE, _YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def _single_colour_png(colour: tuple[int, int, int]) -> bytes:
    return encode(Image.new("RGB", (40, 30), colour), "PNG")


RED = _single_colour_png(_RED)  # fails this pair only
GREEN = _single_colour_png(_GREEN)  # as image1: one score too many
BLUE = _single_colour_png(_BLUE)  # breaks the model for good
YELLOW = _single_colour_png(_YELLOW)  # keeps the model busy a while


def _normalized(colour: tuple[int, int, int]) -> torch.Tensor:
    """How the service hands an image of one colour to the model: [3, 1, 1]."""
    rgb = torch.tensor(colour, dtype=torch.float32) / 255
    return ((rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))[:, None, None]


def busy_work(busy: torch.Tensor, products: int) -> torch.Tensor:
    for _ in range(products):
        busy = torch.tanh(busy @ busy)
    return busy


def busy_products_for(seconds: float) -> int:
    """How many 512 x 512 products take this machine's CPU about `seconds`, with torch's threads."""
    start = torch.full((512, 512), 1.0 / 512)
    busy_work(start, 5)  # warm-up
    began = time.perf_counter()
    busy_work(start, 20)
    per_product = (time.perf_counter() - began) / 20
    return max(MIN_BUSY_PRODUCTS, math.ceil(seconds / per_product))


class FailingSiameseNet(SiameseNet):
    def __init__(self, busy_products: int) -> None:
        backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        super().__init__(backbone, channels=8, embedding_dim=16)
        self.register_buffer("red", _normalized(_RED))
        self.register_buffer("green", _normalized(_GREEN))
        self.register_buffer("blue", _normalized(_BLUE))
        self.register_buffer("yellow", _normalized(_YELLOW))
        self.register_buffer("broken", torch.zeros((), dtype=torch.bool))
        self.busy_products = busy_products

    def _any_is(self, x: torch.Tensor, colour: torch.Tensor) -> bool:
        return bool(((x - colour).abs() < 0.05).flatten(1).all(dim=1).any())

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self._any_is(x, self.blue):
            self.broken.fill_(True)
        if bool(self.broken):
            raise RuntimeError("the model is broken: it saw a blue image")
        if self._any_is(x, self.red):
            raise RuntimeError("the model cannot take a red image")
        if self._any_is(x, self.yellow):
            busy = busy_work(torch.full((512, 512), 1.0 / 512), self.busy_products)
            x = x + 0.0 * busy.mean()  # used, so that nothing can skip the work
        return self.backbone(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        scores = self.similarity(self.embed(self.features(x1)), self.embed(self.features(x2)))
        if self._any_is(x1, self.green):
            return torch.cat([scores, scores[:1]])
        return scores


def export_failing_model(store: Path) -> Path:
    """The failing model in `store/failing`, made with training.export like any served model."""
    torch.manual_seed(0)
    model = FailingSiameseNet(busy_products_for(BUSY_SECONDS))
    export_model(model, store / FAILING_MODEL_NAME, {
        "name": FAILING_MODEL_NAME, "version": "0.0.1", "backbone": "tiny-conv", "input_size": list(INPUT_SIZE),
        "resize_policy": "stretch", "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "threshold": 0.5, "metrics": {}, "dataset": {"name": "none (test model that fails on purpose)"},
        "training": {"command": "tests/app/failing_model.py", "seed": 0},
    })
    return store
