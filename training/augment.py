"""Training augmentation on cached uint8 image tensors, and the normalization of torchvision's backbones."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# ImageNet statistics: the convention of torchvision's backbones, so local torchvision weights fit as they are.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_augmentation(
    input_size: tuple[int, int],
    crop_scale: float,
    hflip: bool,
    vflip: bool,
    rotation: float,
    color_jitter: float,
) -> v2.Transform:
    """Per-image random transforms; ``crop_scale`` 1 means no crop (the image is only resized)."""
    steps: list[v2.Transform] = []
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    if crop_scale < 1:
        steps.append(v2.RandomResizedCrop(input_size, scale=(crop_scale, 1.0), antialias=True))
    else:
        steps.append(v2.Resize(input_size, antialias=True))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose(steps)


def augment_batch(images: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """Apply ``transform`` to each image separately: v2 would draw one set of random parameters per batch."""
    return torch.stack([transform(image) for image in images])
