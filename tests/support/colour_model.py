"""The test suite's small real model: a Siamese network that tells the drawn classes of
`tests.support.images.class_image` apart, so that tests see both of its decisions.

Its weights are set, not learned, so that it is instant to build, the same on every machine, and its decisions are
known in advance: pairs of one class score well above its threshold, pairs of two classes well below, with a
spread between pairs that the tests' tolerances can see (an untrained network scored every pair 0.97-0.99).

- `features`: a 1 x 1 convolution that undoes the input normalisation and measures, at each pixel, how much more
  of one primary colour than of the other two it holds (``2 r - g - b`` for red), minus a threshold that the dark
  noisy backgrounds of the drawn images rarely pass, and how much brighter than mid-grey it is (so that grey
  pictures, which hold no colour, still differ); a ReLU; then the average over blocks of CELL x CELL pixels,
  which makes the grid of cells the explanations are drawn on (4 x 4 at 128 x 128 px). So each channel of a
  cell says how much of the cell one colour (or brightness) covers.
- `embed`: SiameseNet's own affine projection of the average-pooled features: the four amounts, each less a
  small constant (so that two images of different colours have a negative dot product), rotated into
  EMBEDDING_DIM dimensions (which keeps dot products).
- `similarity`: SiameseNet's own calibrated dot product, its scale and bias putting the threshold halfway between
  the dot products of same-class and different-class pairs.

It is exported through training's `export_model`: the same TorchScript contract (format version 2, exact
contributions) and manifest as any trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contract.manifest import Manifest
from training.export import export_model
from training.model import IMAGENET, SiameseNet

NAME = "tiny"
VERSION = "0.0.1"
BACKBONE = "colour-detectors"  # not one of training's: this model's weights are set by hand
INPUT_SIZE = (128, 128)
CELL = 32  # pixels per side of a cell: a 4 x 4 grid at INPUT_SIZE
EMBEDDING_DIM = 8
THRESHOLD = 0.5
# In [0, 1] RGB units: a pixel counts toward "red" by 2 r - g - b beyond this. A class colour is about 1.4 over
# it; the backgrounds' noise (each channel in [0, 0.47]) passes it at a few per cent of its pixels.
COLOUR_MARGIN = 0.6
# Subtracted from each colour amount in the embedding: an image's own colour then dominates its embedding, the
# two it lacks count against a match.
CENTRE = 0.1
# Brightness counts from mid-grey on (class images, all darker, have none), and less: 0.05 is subtracted from it.
MID_GREY = 0.5
BRIGHTNESS_CENTRE = 0.05
# Dot products of embeddings: same-class pairs of class_image's make 0.036-0.13, different-class pairs -0.012 to
# -0.054 (45 pictures of tests/support/images.py's sizes); the threshold is between them, and LOGIT_PER_DOT
# spreads them over scores of 0.87-0.9999 and 0.02-0.19.
THRESHOLD_DOT = 0.008
LOGIT_PER_DOT = 70.0


def build_colour_model(seed: int = 0) -> SiameseNet:
    mean, std = torch.tensor(IMAGENET.mean), torch.tensor(IMAGENET.std)
    detectors = nn.Conv2d(3, 4, kernel_size=1)
    # On RGB x in [0, 1]: `2 x_k - x_j - x_l - COLOUR_MARGIN` for each colour k, `mean(x) - MID_GREY`. The input is
    # x_normalized = (x - mean) / std, so x = mean + std * x_normalized.
    on_rgb = torch.cat([3 * torch.eye(3) - torch.ones(3, 3), torch.full((1, 3), 1 / 3)])
    backbone = nn.Sequential(detectors, nn.ReLU(), nn.AvgPool2d(CELL))
    model = SiameseNet(backbone, channels=4, embedding_dim=EMBEDDING_DIM)
    rotation, _ = torch.linalg.qr(torch.randn(EMBEDDING_DIM, 4, generator=torch.Generator().manual_seed(seed)))
    linear, norm = model.projection
    with torch.no_grad():
        detectors.weight.copy_((on_rgb * std)[:, :, None, None])
        detectors.bias.copy_(on_rgb @ mean - torch.tensor([COLOUR_MARGIN] * 3 + [MID_GREY]))
        linear.weight.copy_(rotation)
        linear.bias.copy_(rotation @ -torch.tensor([CENTRE] * 3 + [BRIGHTNESS_CENTRE]))
        # BatchNorm1d in eval mode as the identity: (x - 0) / sqrt(var + eps) * 1 + 0 with var + eps == 1.
        norm.running_mean.zero_()
        norm.running_var.fill_(1 - norm.eps)
        norm.weight.fill_(1)
        norm.bias.zero_()
        # logit = scale * <e1, e2> / D + bias = LOGIT_PER_DOT * (<e1, e2> - THRESHOLD_DOT): 0 at the threshold.
        model.scale.fill_(LOGIT_PER_DOT * EMBEDDING_DIM)
        model.bias.fill_(-LOGIT_PER_DOT * THRESHOLD_DOT)
    return model.eval()


def export_colour_model(store: Path) -> Manifest:
    """Export the model as `store/NAME`, as training exports its models."""
    return export_model(build_colour_model(), store / NAME, {
        "name": NAME,
        "version": VERSION,
        "backbone": BACKBONE,
        "input_size": list(INPUT_SIZE),
        "resize_policy": "stretch",
        "normalization": IMAGENET.model_dump(),
        "threshold": THRESHOLD,
        "metrics": {},
        "dataset": {"name": "tests.support.images.class_image (drawn red, green and blue shapes)"},
        "training": {"command": "tests/support/colour_model.py (weights set by hand, not trained)", "seed": 0},
    })
