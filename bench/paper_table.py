"""The paper's experiment on its three datasets: one Siamese model per dataset and recipe, trained with
`python -m training train`, and one table of their test-split pair metrics (issue 9, item 4).

Run from the repository root: `.venv/bin/python -m bench.paper_table` (needs ../shared/datasets). Each run
exports into RUNS/<dataset>-<recipe>/ (default runs/paper/); a folder that already holds a manifest is
tabulated as it is, not trained again, so the table can be rebuilt, or completed after an interruption, for
free. `--datasets` and `--recipes` pick a subset. The training time is the one the run recorded in its
manifest (`training.wall_time_s`); the command is the exact one that trained it (`training.command`).

A similar pair is two images of one class folder: one flower species (flowers), one diagnosis (skin_cancer:
benign or malignant) and one room type (airbnb: bedroom, kitchen, ...; not "the same room", which the file
names would allow). Classes with fewer than `training.data.MIN_IMAGES_TO_SPLIT` images (airbnb's basement,
decor, entrance, outdoor, staircase and tv-room) cannot appear in every split: `train` keeps all their images
for training and says so, so no evaluation pair involves them. A class with a single image in a split (airbnb's
backyard, 4 images) gets that image paired with itself as its similar pair, as `training.data.make_pairs` does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from contract.manifest import Manifest, read_manifest
from deploy.nginx_config import REPO_ROOT

DATASETS_DIR = REPO_ROOT.parent / "shared" / "datasets"
DATASETS: tuple[str, ...] = ("flowers", "skin_cancer", "airbnb")
# The recipes the table compares: the first default model (resnet18 from scratch), the second (Lite0, its pair
# stage training the projection head only) and the current one (`make default-model`, whose pair stage also
# trains the backbone's last three layers; tests/training/test_default_model.py keeps it in step with this entry).
RECIPES: dict[str, tuple[str, ...]] = {
    "resnet18-scratch": ("--backbone", "resnet18", "--input-size", "128", "--classify-epochs", "40",
                         "--epochs", "12", "--freeze-backbone", "--patience", "10"),
    "lite0-pretrained": ("--backbone", "efficientnet_lite0", "--pretrained", "--input-size", "224",
                         "--classify-epochs", "12", "--lr", "5e-4", "--epochs", "5", "--loss", "bce",
                         "--freeze-backbone"),
    "lite0-pretrained-tail": ("--backbone", "efficientnet_lite0", "--pretrained", "--input-size", "224",
                              "--classify-epochs", "12", "--lr", "5e-4", "--epochs", "6", "--loss", "bce",
                              "--freeze-backbone", "--unfreeze-last", "3", "--pair-lr", "3e-4"),
}
DEFAULT_RECIPE = "lite0-pretrained-tail"  # the bundled model's; bench/gpu_run.sh trains its larger backbones with it


def train_command(dataset: Path, recipe: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "training", "train", "--data", str(dataset), *RECIPES[recipe],
            "--output", str(output), "--checkpoint-dir", str(output.with_name(output.name + "-checkpoint"))]


def table_row(dataset: str, recipe: str, manifest: Manifest) -> str:
    test = manifest.metrics["test"]
    precision, recall = test["precision"], test["recall"]
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    height, width = manifest.input_size
    minutes = manifest.training["wall_time_s"] / 60
    return (f"| {dataset} | {recipe} | {height}x{width} | {test['pairs']} | {test['accuracy']:.4f} | "
            f"{test['roc_auc']:.4f} | {precision:.4f} | {recall:.4f} | {f1:.4f} | {minutes:.1f} min | "
            f"`{manifest.training['command']}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--data-root", type=Path, default=DATASETS_DIR, help="folder holding the datasets")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "paper", help="where runs export")
    args = parser.parse_args()

    rows = []
    for dataset in args.datasets:
        if not (args.data_root / dataset).is_dir():
            parser.exit(2, f"{args.data_root / dataset} is missing: pass --data-root, the folder that holds "
                           f"{', '.join(DATASETS)}\n")
        for recipe in args.recipes:
            output = args.runs / f"{dataset}-{recipe}"
            if not (output / "manifest.json").is_file():
                print(f"training {dataset} with {recipe} into {output}", flush=True)
                subprocess.run(train_command(args.data_root / dataset, recipe, output), check=True, cwd=REPO_ROOT)
            rows.append(table_row(dataset, recipe, read_manifest(output)))
    print("| dataset | recipe | input | test pairs | accuracy | ROC AUC | precision | recall | F1 | training time "
          "| command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
