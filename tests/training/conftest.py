"""A tiny image-folder dataset the tests draw themselves: one colour and shape per class, on noisy backgrounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.__main__ import main

REPO = Path(__file__).resolve().parents[2]

SHAPES: dict[str, tuple[int, int, int]] = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 70, 230)}
IMAGES_PER_CLASS = 30
SIDE = 40


def draw_shapes_dataset(root: Path, images_per_class: int = IMAGES_PER_CLASS, seed: int = 0) -> Path:
    generator = np.random.default_rng(seed)
    for shape, colour in SHAPES.items():
        (root / shape).mkdir(parents=True)
        for index in range(images_per_class):
            background = generator.integers(0, 120, size=(SIDE, SIDE, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            size = int(generator.integers(14, 26))
            left, top = (int(v) for v in generator.integers(2, SIDE - size - 2, size=2))
            box = (left, top, left + size, top + size)
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse(box, fill=colour)
            elif shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(left, top + size), (left + size, top + size), (left + size // 2, top)], fill=colour)
            image.save(root / shape / f"{shape}_{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_shapes_dataset(tmp_path_factory.mktemp("shapes"))


# Small enough for a few seconds per run on two CPU cores, big enough to learn colours and shapes: two epochs of
# each stage made a test split of 36 pairs all correct (with four classifying epochs, 33 of 36), 4.5 s less a run.
TINY_CLASSIFY_EPOCHS = 2
TINY_PAIR_EPOCHS = 2
TINY_TRAIN_ARGS: list[str] = [
    "--input-size", "32", "--classify-epochs", str(TINY_CLASSIFY_EPOCHS), "--epochs", str(TINY_PAIR_EPOCHS),
    "--batch-size", "16", "--validation-fraction", "0.2", "--test-fraction", "0.2", "--device", "cpu",
]


def train_command(dataset: Path, work: Path, *extra: str) -> list[str]:
    """The tiny run's command line, exporting to work/shapes with checkpoints in work/checkpoints."""
    return ["train", "--data", str(dataset), "--name", "shapes", "--output", str(work / "shapes"),
            "--checkpoint-dir", str(work / "checkpoints"), *TINY_TRAIN_ARGS, *extra]


def start_training(arguments: list[str], env: Mapping[str, str] | None = None,
                   stderr: IO[str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m training ARGUMENTS` started in a process of its own, as a user runs it, with `env` added to
    this environment. Runs compared with one made in a process of its own must not run in the test process: the
    services other tests start there change process-wide state (glibc's malloc settings, contract/memory.py),
    and a tiny model's validation ROC AUC then moved by one tied pair (0.7469 against 0.75)."""
    return subprocess.Popen([sys.executable, "-m", "training", *arguments], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=stderr)


def run_training(arguments: list[str], env: Mapping[str, str] | None = None) -> None:
    """`python -m training ARGUMENTS` in a process of its own (see start_training), to its end."""
    finish_training(start_training(arguments, env), arguments)


def finish_training(process: subprocess.Popen[bytes], arguments: list[str]) -> None:
    """Wait for a run from start_training; CalledProcessError if it failed."""
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, ["python", "-m", "training", *arguments])


@pytest.fixture(scope="session")
def trained(shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted tiny run: its exported folder and manifest (checkpoints beside it, in checkpoints/)."""
    work = tmp_path_factory.mktemp("trained")
    main(train_command(shapes_dataset, work))
    model_dir = work / "shapes"
    return model_dir, json.loads((model_dir / "manifest.json").read_text())
