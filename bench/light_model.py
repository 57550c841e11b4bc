"""A model that costs almost nothing, so that a benchmark measures the serving around it, as on a GPU.

On the H200 the default model took 6-7 ms of a /similarity request and the service reached 0.37x of the
model's ceiling (bench/RESULTS.md, "On a GPU"): there the web, decoding and handoff work is the cost. This
exports a model of one convolution at 32 x 32 px with training's own export (every contract method and check,
like any served model), so that the same comparison can be made on a CPU: a resnet18 at 32 px was still half of
the service's CPU time on 2 cores (bench/RESULTS.md, "The serving around a nearly free model").

    .venv/bin/python -m bench.light_model runs/light          # writes runs/light/light/
    .venv/bin/python -m bench.peers --model runs/light/light
    .venv/bin/python -m bench.profile_service --model runs/light/light
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.export import export_model
from training.model import SiameseNet

NAME = "light"
INPUT_SIZE = (32, 32)


def export_light_model(store: Path) -> Path:
    """`store/light`: one 3x3 convolution (8 channels, stride 2) and the usual head, untrained (seeded): its scores
    are arbitrary but exactly reproducible."""
    torch.manual_seed(0)
    model = SiameseNet(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()), channels=8,
                       embedding_dim=16)
    export_model(model, store / NAME, {
        "name": NAME, "version": "0.0.1", "backbone": "one-convolution", "input_size": list(INPUT_SIZE),
        "resize_policy": "stretch", "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": 0.5, "metrics": {}, "dataset": {"name": "none (untrained benchmark model)"},
        "training": {"command": "python -m bench.light_model", "seed": 0},
    })
    return store / NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="model store folder to write the model into")
    print(export_light_model(parser.parse_args().store))


if __name__ == "__main__":
    main()
