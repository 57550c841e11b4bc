"""`python -m training evaluate`: score an exported model on an image-folder dataset with the paper's pairs.

It reads the model folder through the contract (contract/) exactly as the service does: the same manifest
validation, the same TorchScript loading, the same decoding, resize policy and normalisation, so it measures
what is served.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.explainers.contributions import ThresholdUnreachable, threshold_raw_logit
from contract.manifest import MODEL_FILE, Manifest, ManifestError, read_manifest, write_manifest
from contract.preprocess import Preprocessing
from contract.torchscript import TorchScriptError, load_torchscript
from training.data import DatasetError, decode_images, make_pairs, scan_image_folder, split_by_image
from training import faithfulness
from training.errors import UsageError
from training.metrics import format_table, pair_metrics
from training.report import ScoredPairs, write_report
from training.train import fixed_pairs_generator, score_pairs


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder holding model.pt and manifest.json")
    parser.add_argument("--data", type=Path, required=True, help="image-folder dataset: one sub-folder per class")
    parser.add_argument("--split", choices=("all", "train", "validation", "test"), default="all",
                        help="evaluate on every image, or on one split of the model's own training split "
                             "(re-made from the manifest's seed and fractions and checked against its sha256)")
    parser.add_argument("--seed", type=int, help="pair seed (default: the manifest's training seed)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the metrics to this file")
    parser.add_argument("--faithfulness", action="store_true",
                        help="also measure deletion and insertion curves of Grad-CAM, the exact contributions and a "
                             "random order (training/faithfulness.py) and record them in the manifest's "
                             "metrics.faithfulness; needs a format-version-2 model")
    parser.add_argument("--faithfulness-pairs", type=int, default=None,
                        help="measure faithfulness on at most this many pairs, evenly spread (default: every pair)")
    parser.add_argument("--report", action="store_true",
                        help="also write report.html into the model folder: ROC, score histograms, reliability, "
                             "confusion matrix, accuracy per pair of classes, learning curves, faithfulness and the "
                             "most confident right and wrong pairs, for this split (training/report.py)")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    try:
        manifest = read_manifest(args.model)
        module = load_torchscript(args.model / MODEL_FILE, manifest.format_version)
    except (ManifestError, TorchScriptError) as error:
        raise UsageError(str(error)) from error
    if args.faithfulness and manifest.format_version < 2:
        raise UsageError(
            f"{args.model} has format_version {manifest.format_version}; --faithfulness compares the exact "
            "contributions, which need format version 2: re-export the model with this version's "
            "`python -m training train`"
        )
    preprocessing = Preprocessing.of(manifest)
    seed = manifest.training["seed"] if args.seed is None else args.seed
    chosen = evaluation_set(manifest, args.data, args.split, seed)
    labels, pairs = chosen.labels, chosen.pairs
    images = decode_images(chosen.paths, preprocessing.input_size)
    with torch.no_grad():
        embeddings = torch.cat([
            module.embed(module.features(preprocessing.normalize(images[start:start + args.batch_size])))
            for start in range(0, len(images), args.batch_size)
        ])
    scores = score_pairs(module, embeddings, pairs)
    metrics = {args.split: pair_metrics(pairs[2], scores, manifest.threshold)}
    print(f"{manifest.name} {manifest.version} on {args.data} ({len(chosen.paths)} images, "
          f"threshold {manifest.threshold:.4f})")
    print(format_table(metrics))
    if args.faithfulness:
        metrics["faithfulness"] = _faithfulness(args, module, manifest, preprocessing, images, pairs, seed)
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.report:
        # read again: --faithfulness has just recorded its result there
        path = write_report(args.model, read_manifest(args.model), module,
                            ScoredPairs(args.split, images, labels, pairs, scores),
                            "python -m training " + shlex.join(args.argv))
        print(f"wrote {path}")
    return metrics


@dataclass(frozen=True)
class EvaluationSet:
    """The images of a dataset that an evaluation scores, and the paper's pairs of them (positions in `paths`)."""

    paths: list[Path]
    labels: list[int]
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # (first, second, target)


def evaluation_set(manifest: Manifest, data: Path, split: str, seed: int) -> EvaluationSet:
    """Every image of the image-folder dataset `data` (split "all", pairs drawn with `seed`), or one split of the
    model's own training split, re-made from the manifest's seed and fractions and checked against its sha256,
    with the pairs training drew for it (given the training seed)."""
    folder = scan_image_folder(data)
    if split == "all":
        indices = list(range(len(folder.paths)))
        generator = np.random.default_rng(seed)
    else:
        recorded = manifest.dataset["split"]
        made = split_by_image(folder.labels, recorded["validation_fraction"], recorded["test_fraction"],
                              recorded["seed"])
        if made.fingerprint(folder) != recorded["sha256"]:
            raise DatasetError(
                f"{data} does not reproduce the split this model was trained with (sha256 differs); "
                "pass the same dataset, or --split all to evaluate on every image"
            )
        indices = made.indices[split]
        generator = fixed_pairs_generator(seed, split)
    labels = [folder.labels[i] for i in indices]
    return EvaluationSet([folder.paths[i] for i in indices], labels, make_pairs(labels, generator))


def _faithfulness(args: argparse.Namespace, module: torch.jit.ScriptModule, manifest: Manifest,
                  preprocessing: Preprocessing, images: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                  seed: int) -> dict[str, Any]:
    """Deletion and insertion areas on (a spread subset of) the pairs, printed and recorded in the manifest."""
    try:
        boundary = threshold_raw_logit(module, manifest.threshold)
    except ThresholdUnreachable as error:
        raise UsageError(f"{error}; --faithfulness needs a threshold the score can reach") from error
    chosen = faithfulness.spread_subset(len(pairs[0]), args.faithfulness_pairs)
    first, second = pairs[0][chosen], pairs[1][chosen]
    starts = range(0, len(chosen), args.batch_size)
    result = faithfulness.measure(
        module, manifest, boundary,
        [preprocessing.normalize(images[first[start:start + args.batch_size]]) for start in starts],
        [preprocessing.normalize(images[second[start:start + args.batch_size]]) for start in starts],
        seed,
    )
    result = {"split": args.split, **result}
    print(f"faithfulness on {result['pairs']} pairs ({args.split}), grid {result['grid'][0]}x{result['grid'][1]}: "
          "area under the decided class's probability")
    print(f"{'order':<14} {'deletion (lower is better)':>27} {'insertion (higher is better)':>29}")
    for name in faithfulness.ORDERS:
        print(f"{name:<14} {result['deletion'][name]:>27.4f} {result['insertion'][name]:>29.4f}")
    recorded = manifest.model_copy(update={"metrics": {**manifest.metrics, "faithfulness": result}})
    write_manifest(args.model, recorded)
    return result
