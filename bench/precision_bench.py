"""PRECISION bf16 and fp16 against fp32 (issue 22): every pair of the model's test split, scored each way.

Run from the repository root: `.venv/bin/python -m bench.precision_bench [--model DIR] [--data DIR]
[--device cpu|cuda] [--batch N]`.
The test split's pairs as training drew them (`training.evaluate.evaluation_set`), decoded once as the service
decodes, are scored by the service's batch runner (`app.model.score_pairs`) in batches of --batch pairs with
PRECISION=fp32 (the TorchScript backbone, COMPILE=off: the reference) and with each reduced precision the device
runs, the precisions taking turns batch by batch so that they see the same load from other work. For each it
prints the largest and mean absolute score difference from fp32, the decisions (score >= threshold) that flip and
how close to the threshold those pairs are, the accuracy, and pairs/s of the runner.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from app.model import ServedModel, load_model, score_pairs, warm_up
from bench.service_bench import DEFAULT_MODEL_DIR
from contract.manifest import read_manifest
from contract.memory import keep_freed_memory_for_reuse
from contract.backbone import unsupported_reason
from contract.precision import PRECISIONS, Precision
from training.data import decode_images
from training.evaluate import evaluation_set

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers"
DEFAULT_BATCH = {"cpu": 8, "cuda": 64}  # the service's MAX_BATCH_SIZE on a CPU; a GPU batch


def load_average() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dataset the model was trained on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, help="pairs per batch (default: 8 on a CPU, 64 on a GPU)")
    args = parser.parse_args()
    keep_freed_memory_for_reuse()
    device = torch.device(args.device)
    batch = args.batch or DEFAULT_BATCH[device.type]
    manifest = read_manifest(args.model)
    chosen = evaluation_set(manifest, args.data, "test", manifest.training["seed"])
    first, second, target = chosen.pairs
    print(f"{load_average()} before; model {manifest.name} ({manifest.backbone}, {manifest.input_size[0]} px), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; test split: "
          f"{len(chosen.paths)} images, {len(target)} pairs, batches of {batch}", flush=True)
    pictures = list(decode_images(chosen.paths, manifest.input_size))

    models: dict[Precision, ServedModel] = {}
    for precision in PRECISIONS:
        reason = unsupported_reason(precision, device)
        if reason:
            print(f"{precision}: not measured ({reason})")
            continue
        models[precision] = load_model(args.model, args.device, precision)
        warm_up(models[precision])
    scores: dict[Precision, list[float]] = {precision: [] for precision in models}
    seconds = dict.fromkeys(models, 0.0)
    for start in range(0, len(target), batch):
        pictures1 = [pictures[index] for index in first[start:start + batch]]
        pictures2 = [pictures[index] for index in second[start:start + batch]]
        for precision, model in models.items():
            started = time.perf_counter()
            scores[precision] += score_pairs(model, pictures1, pictures2)
            seconds[precision] += time.perf_counter() - started

    reference = np.array(scores["fp32"])
    threshold = manifest.threshold
    print(f"\n{'precision':<10} {'largest |diff|':>15} {'mean |diff|':>12} {'flipped':>8} {'flips within':>13} "
          f"{'accuracy':>9} {'pairs/s':>8} {'vs fp32':>8}")
    for precision in models:
        measured = np.array(scores[precision])
        difference = np.abs(measured - reference)
        flipped = (measured >= threshold) != (reference >= threshold)
        # how far from the threshold, in fp32, the farthest flipped pair is: flips should be of borderline pairs
        within = f"{np.abs(reference[flipped] - threshold).max():.2e}" if flipped.any() else "-"
        accuracy = float(np.mean((measured >= threshold) == (target == 1)))
        rate = len(target) / seconds[precision]
        print(f"{precision:<10} {difference.max():>15.2e} {difference.mean():>12.2e} {int(flipped.sum()):>8} "
              f"{within:>13} {accuracy:>9.4f} {rate:>8.1f} {seconds['fp32'] / seconds[precision]:>7.2f}x")
    print(f"\n{load_average()} after")


if __name__ == "__main__":
    main()
