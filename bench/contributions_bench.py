"""Cost of exact contributions: model work per batch of `/explain?method=contributions` against `/similarity`'s.

Run from the repository root: `.venv/bin/python -m bench.contributions_bench [--model model_store/flowers]`.
It times the service's own batch runners (app/model.py) on the same pairs in one run, batch 1 and 8:
`score_pairs` (what a /similarity batch runs), `explain_pairs(..., "contributions")` and, for reference,
`explain_pairs(..., "gradcam")`. The three are timed in alternating rounds, so that load from other jobs on
the machine falls on all of them alike; the ratio reported is the median over the rounds.

A format-version-1 model (such as the default `flowers` 1.0.0) cannot compute contributions; its weights are
then re-exported as version 2 into a temporary folder (training/export.py, with all its checks) and timed
there. The model store is not touched. Issue 12's target: contributions add at most 10 % to /similarity's
model work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.model import ServedModel, explain_pairs, load_model, score_pairs
from bench.service_bench import MODEL_NAME, MODEL_STORE, load_pairs, model_inputs
from deploy.load import FLOWERS_DIR
from training.export import export_model
from training.model import build_siamese

BATCH_SIZES = (1, 8)
PAIR_COUNT = 8
ROUNDS = 7
ROUND_SECONDS = 1.0  # each runner is timed for at least this long per round
WARMUP_CALLS = 10  # TorchScript's profiling executor optimises during its first calls of each shape
TARGET_EXTRA = 0.10


def as_version_2(served: ServedModel, folder: Path) -> ServedModel:
    """The served model's own weights, exported at format version 2 into `folder`."""
    manifest = served.manifest
    eager = build_siamese(manifest.backbone, manifest.embedding_dim)
    eager.load_state_dict(served.module.state_dict())
    keep = manifest.model_dump(exclude={"format_version", "created_at", "embedding_dim", "feature_map",
                                        "torch_version", "torchvision_version", "sha256"})
    export_model(eager, folder, keep)
    return load_model(folder, "cpu")


def seconds_per_pair(work: Callable[[], object], pairs_per_call: int) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < ROUND_SECONDS:
        work()
        calls += 1
    return elapsed / (calls * pairs_per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_STORE / MODEL_NAME, help="model folder")
    args = parser.parse_args()
    served = load_model(args.model, "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        note = ""
        if "contributions" not in served.methods:
            served = as_version_2(served, Path(scratch) / served.manifest.name)
            note = ", re-exported as format version 2 in a temporary folder"
        pairs = load_pairs(PAIR_COUNT)
        x1, x2 = model_inputs(served, pairs)
        images = "flowers JPEG files" if FLOWERS_DIR.is_dir() else "Pillow drawings (JPEG + PNG)"
        print(f"model {served.manifest.name} {served.manifest.version} ({served.manifest.backbone}, "
              f"{served.input_size[0]}x{served.input_size[1]}, grid {served.manifest.feature_map.height}x"
              f"{served.manifest.feature_map.width}{note}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, {PAIR_COUNT} pairs of {images}, {ROUNDS} rounds")
        ratios = {}
        for batch in BATCH_SIZES:
            first, second = list(x1[:batch]), list(x2[:batch])
            runners: dict[str, Callable[[], object]] = {
                "score_pairs (/similarity)": lambda: score_pairs(served, first, second),
                "contributions": lambda: explain_pairs(served, first, second, "contributions"),
                "gradcam": lambda: explain_pairs(served, first, second, "gradcam"),
            }
            for work in runners.values():
                for _ in range(WARMUP_CALLS):
                    work()
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(ROUNDS):
                for name, work in runners.items():
                    times[name].append(seconds_per_pair(work, batch))
            medians = {name: statistics.median(values) for name, values in times.items()}
            ratio_per_round = [c / s for c, s in zip(times["contributions"], times["score_pairs (/similarity)"],
                                                     strict=True)]
            ratios[batch] = statistics.median(ratio_per_round)
            print(f"batch {batch}: " + ", ".join(f"{name} {1000 * value:.2f} ms/pair"
                                                  for name, value in medians.items())
                  + f"; contributions / score_pairs per round: "
                  + " ".join(f"{ratio:.3f}" for ratio in ratio_per_round))
    print(f"\n{'target':<58} {'measured':>9} {'goal':>8}  result")
    for batch, ratio in ratios.items():
        met = "met" if ratio <= 1 + TARGET_EXTRA else "NOT MET"
        print(f"{f'contributions vs /similarity model work, batch {batch}':<58} {ratio:>8.3f}x "
              f"{f'<= {1 + TARGET_EXTRA:.2f}x':>8}  {met}")


if __name__ == "__main__":
    main()
