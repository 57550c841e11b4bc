"""Image-folder datasets: scan, split by image, decode once into memory, and build pairs the paper's way.

Every image is decoded exactly once into a uint8 tensor; augmentation then runs on tensors. On a small CPU,
decoding JPEGs every epoch would otherwise cost as much as the training itself.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from contract.preprocess import decode_for_model
from training.errors import UsageError

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class DatasetError(UsageError):
    """The folder cannot be used as an image-folder dataset; the message says how to fix it."""


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(index) for index, name in enumerate(self.classes)}


def _is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def scan_image_folder(root: Path) -> ImageFolder:
    """One sub-folder per class; unreadable or non-image files are skipped with a warning naming them."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; pass an image-folder dataset (one sub-folder per class)")
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(
            f"{root} has {len(class_dirs)} class folder(s); similarity needs at least two classes, "
            "one sub-folder of images per class"
        )
    classes, paths, labels, skipped = [], [], [], []
    for class_dir in class_dirs:
        label = len(classes)
        classes.append(class_dir.name)
        found = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if _is_readable_image(path):
                paths.append(path)
                labels.append(label)
                found += 1
            else:
                skipped.append(str(path.relative_to(root)))
        if found == 0:
            raise DatasetError(f"class folder {class_dir} holds no readable image; add images or remove the folder")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable or non-image file(s) in {root}: {', '.join(skipped)}", stacklevel=2
        )
    return ImageFolder(root, classes, paths, labels, skipped)


# A class needs an image in each of the three splits; smaller ones go wholly to training, where they still pair.
MIN_IMAGES_TO_SPLIT = 3


@dataclass
class Split:
    """Indices into an ImageFolder's images for each of train, validation and test."""

    indices: dict[str, list[int]]
    training_only: list[int] = field(default_factory=list)  # labels of classes too small to split

    def fingerprint(self, folder: ImageFolder) -> str:
        """sha256 over (split, class, relative path) of every image: two models share it iff their splits match."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for index in sorted(self.indices[split], key=lambda i: str(folder.paths[i])):
                relative = folder.paths[index].relative_to(folder.root).as_posix()
                digest.update(f"{split}\t{folder.classes[folder.labels[index]]}\t{relative}\n".encode())
        return digest.hexdigest()


def split_by_image(labels: list[int], validation_fraction: float, test_fraction: float, seed: int) -> Split:
    """Stratified, seeded split of images (not pairs), so no image can appear in two splits' pairs. Classes of
    fewer than MIN_IMAGES_TO_SPLIT images cannot be stratified: all their images go to train."""
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise DatasetError("validation and test fractions must be in (0, 1) and sum to less than 1")
    counts = Counter(labels)
    training_only = sorted(label for label, count in counts.items() if count < MIN_IMAGES_TO_SPLIT)
    splittable = np.array([i for i, label in enumerate(labels) if counts[label] >= MIN_IMAGES_TO_SPLIT], dtype=int)
    try:
        rest, test = train_test_split(splittable, test_size=test_fraction, stratify=[labels[i] for i in splittable],
                                      random_state=seed)
        train, validation = train_test_split(
            rest,
            test_size=validation_fraction / (1 - test_fraction),
            stratify=[labels[i] for i in rest],
            random_state=seed,
        )
    except ValueError as error:
        raise DatasetError(
            f"cannot split {len(splittable)} images of classes with at least {MIN_IMAGES_TO_SPLIT} images into "
            f"train/validation/test with every class in each ({error}); add images to the smallest class or "
            "change --validation-fraction/--test-fraction"
        ) from error
    train = np.concatenate([train, [i for i, label in enumerate(labels) if label in training_only]]).astype(int)
    parts = {"train": train, "validation": validation, "test": test}
    return Split({name: sorted(indices.tolist()) for name, indices in parts.items()}, training_only)


def make_pairs(labels: list[int], generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's protocol: per image one random partner of its class (similar, target 1) and one of another
    class (dissimilar, target 0). Positions refer to ``labels``. A similar partner is another image when the class
    has one. Returns (first, second, target) arrays of length 2 * len(labels)."""
    labels_array = np.asarray(labels)
    by_class = {label: np.flatnonzero(labels_array == label) for label in np.unique(labels_array)}
    if len(by_class) < 2:
        raise DatasetError("pairs need images of at least two classes in every split")
    first, second, target = [], [], []
    for position, label in enumerate(labels_array):
        same = by_class[label]
        others = same[same != position]
        first.append(position)
        second.append(generator.choice(others if len(others) else same))
        target.append(1)
        other = generator.choice([c for c in by_class if c != label])
        first.append(position)
        second.append(generator.choice(by_class[other]))
        target.append(0)
    return np.array(first), np.array(second), np.array(target, dtype=np.float32)


def decode_images(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """Decode images upright and stretch each to ``size`` exactly as the service does (the contract's decoding and
    resize policy), into one uint8 [N,3,H,W]."""
    out = torch.empty(len(paths), 3, *size, dtype=torch.uint8)
    for index, path in enumerate(paths):
        out[index] = decode_for_model(path, str(path), None, size)
    return out
