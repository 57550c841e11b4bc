"""From an image file to the model's input, as the manifest prescribes: decode (only as large as the input
needs), resize policy (both in `contract.picture`, without torch), then normalisation.

Training caches resized uint8 pictures and normalises batches of them, and so does the service (its queue holds
uint8 pictures, a quarter of the floats' size, normalized a batch at a time on the model's device). Both go
through `decode_for_model` and `normalize` here, so a file becomes the same tensor on either side, and on every
endpoint of the service.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contract.manifest import Manifest, Normalization
from contract.picture import model_picture, stretched


def picture_tensor(picture: np.ndarray) -> torch.Tensor:
    """A uint8 picture array [H, W, C] as the tensor [C, H, W] that shares its memory (channels-last strides, as
    torchvision's resize returned them)."""
    return torch.from_numpy(picture).permute(2, 0, 1)


def resize_to(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """`contract.picture.stretched` (the `stretch` resize policy) as a uint8 tensor [3, H, W]."""
    return picture_tensor(stretched(image, size))


def decode_for_model(source: bytes | Path, name: str, max_pixels: int | None,
                     input_size: tuple[int, int]) -> torch.Tensor:
    """`contract.picture.model_picture` (the file in `source` decoded and resized for `input_size`, [height,
    width]) as the model's uint8 picture tensor [3, H, W]."""
    return picture_tensor(model_picture(source, name, max_pixels, input_size))


def normalize(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """uint8 pictures [..., 3, H, W] to float32 model input: RGB in [0, 1], then (x - mean) / std per channel."""
    mean = torch.tensor(normalization.mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(normalization.std, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class Preprocessing:
    """A manifest's preprocessing: `preprocessing(picture)` is the [3, H, W] float tensor the model expects."""

    def __init__(self, input_size: tuple[int, int], normalization: Normalization) -> None:
        self.input_size = input_size
        self.normalization = normalization

    @classmethod
    def of(cls, manifest: Manifest) -> Preprocessing:
        return cls(manifest.input_size, manifest.normalization)

    def resize(self, image: Image.Image) -> torch.Tensor:
        return resize_to(image, self.input_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.normalization)

    def picture(self, source: bytes | Path, name: str, max_pixels: int | None) -> torch.Tensor:
        """The file in `source` as the uint8 picture [3, H, W] at the input size, to be normalized in a batch."""
        return decode_for_model(source, name, max_pixels, self.input_size)

    def model_input(self, source: bytes | Path, name: str, max_pixels: int | None) -> torch.Tensor:
        """The file in `source` as the [3, H, W] float tensor the model expects."""
        return self.normalize(self.picture(source, name, max_pixels))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))
