"""Which input normalization fits a pretrained backbone: a linear probe on its frozen pooled features.

For each candidate normalization, the pretrained network (no fine-tuning) sees a seeded, stratified sample of
flowers photos. Two figures: a logistic regression trained on the pooled features of one part classifies the
held-out part (the normalization the weights were trained with should give the more separable features), and
the share of the sample's daisy photos that the network's own ImageNet classifier calls "daisy" (a class of
ImageNet's), a direct check of the input the weights expect. One thread, so that it does not starve other jobs
on a shared machine (4-6 minutes for Lite0 on the defaults, measured on a busy 2-core machine).

    .venv/bin/python -m bench.normalization_probe [--data ../shared/datasets/flowers] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from contract.manifest import Normalization
from contract.preprocess import normalize
from training.data import decode_images, scan_image_folder
from training.efficientnet_lite import VARIANTS, EfficientNetLite, efficientnet_lite, packaged_weights
from training.model import IMAGENET, SIGNED_UNIT

DAISY = 985  # ImageNet's class index of "daisy"
CANDIDATES: dict[str, Normalization] = {"mean/std 0.5 ([-1, 1])": SIGNED_UNIT, "ImageNet mean/std": IMAGENET}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers"


@torch.no_grad()
def pooled_features(net: EfficientNetLite, images: torch.Tensor, normalization: Normalization,
                    batch_size: int = 32) -> torch.Tensor:
    return torch.cat([net.features(normalize(images[start:start + batch_size], normalization)).mean(dim=(2, 3))
                      for start in range(0, len(images), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image-folder dataset")
    parser.add_argument("--backbone", choices=tuple(VARIANTS), default="efficientnet_lite0")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    folder = scan_image_folder(args.data)
    chosen, _ = train_test_split(np.arange(len(folder.paths)), train_size=args.train_images + args.test_images,
                                 stratify=folder.labels, random_state=args.seed)
    labels = np.array(folder.labels)[chosen]
    train, test = train_test_split(np.arange(len(chosen)), train_size=args.train_images, stratify=labels,
                                   random_state=args.seed)
    images = decode_images([folder.paths[i] for i in chosen], (args.input_size, args.input_size))
    net = efficientnet_lite(args.backbone, packaged_weights(args.backbone)).eval()
    daisy_label = next((i for i, name in enumerate(folder.classes) if name.lower() == "daisy"), None)
    daisies = labels == daisy_label
    print(f"{args.backbone} (frozen, packaged ImageNet weights), {args.input_size} px, {args.data}: "
          f"{len(train)} training / {len(test)} held-out images, seed {args.seed}")
    for label, normalization in CANDIDATES.items():
        pooled = pooled_features(net, images, normalization)
        features = pooled.numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(features[train], labels[train])
        line = f"  {label:<24} held-out accuracy {probe.score(features[test], labels[test]):.3f}"
        if daisies.any():
            with torch.no_grad():
                called_daisy = (net.classifier(pooled[torch.from_numpy(daisies)]).argmax(dim=1) == DAISY).float()
            line += f", ImageNet 'daisy' for {float(called_daisy.mean()):.3f} of {int(daisies.sum())} daisy photos"
        print(line)
    print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
