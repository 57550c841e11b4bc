"""`python -m training evaluate`: score an exported model on an image-folder dataset with the paper's pairs.

It reads the model folder through the contract (contract/) exactly as the service does: the same manifest
validation, the same TorchScript loading, the same decoding, resize policy and normalisation, so it measures
what is served.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.manifest import MODEL_FILE, ManifestError, read_manifest
from contract.preprocess import Preprocessing
from contract.torchscript import TorchScriptError, load_torchscript
from training.data import DatasetError, decode_images, make_pairs, scan_image_folder, split_by_image
from training.errors import UsageError
from training.metrics import format_table, pair_metrics
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


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    try:
        manifest = read_manifest(args.model)
        module = load_torchscript(args.model / MODEL_FILE, manifest.format_version)
    except (ManifestError, TorchScriptError) as error:
        raise UsageError(str(error)) from error
    preprocessing = Preprocessing.of(manifest)
    seed = manifest.training["seed"] if args.seed is None else args.seed
    folder = scan_image_folder(args.data)
    if args.split == "all":
        indices = list(range(len(folder.paths)))
        generator = np.random.default_rng(seed)
    else:
        recorded = manifest.dataset["split"]
        split = split_by_image(folder.labels, recorded["validation_fraction"], recorded["test_fraction"],
                               recorded["seed"])
        if split.fingerprint(folder) != recorded["sha256"]:
            raise DatasetError(
                f"{args.data} does not reproduce the split this model was trained with (sha256 differs); "
                "pass the same dataset, or --split all to evaluate on every image"
            )
        indices = split.indices[args.split]
        generator = fixed_pairs_generator(seed, args.split)
    labels = [folder.labels[i] for i in indices]
    pairs = make_pairs(labels, generator)
    images = decode_images([folder.paths[i] for i in indices], preprocessing.input_size)
    with torch.no_grad():
        embeddings = torch.cat([
            module.embed(module.features(preprocessing.normalize(images[start:start + args.batch_size])))
            for start in range(0, len(images), args.batch_size)
        ])
    metrics = {args.split: pair_metrics(pairs[2], score_pairs(module, embeddings, pairs), manifest.threshold)}
    print(f"{manifest.name} {manifest.version} on {args.data} ({len(indices)} images, "
          f"threshold {manifest.threshold:.4f})")
    print(format_table(metrics))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
