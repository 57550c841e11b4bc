"""From an image file to the model's uint8 picture, without torch: the manifest's `stretch` resize policy over
`contract.images`' decoding, with `contract.resize`'s resize.

The service's front processes make pictures with it and no torch in their memory; `contract.preprocess` turns the
same arrays into the tensors training and the model's process use, so that every side sees the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from contract.images import decode_upright_rgb
from contract.resize import antialiased_resize


def stretched(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The `stretch` resize policy: the whole picture to `size` ([height, width]), no crop, antialiased; uint8
    [H, W, channels] (3 for RGB). Nothing is cut off, so every heatmap cell maps back onto the whole original."""
    pixels = np.asarray(image)
    return antialiased_resize(pixels.reshape(*pixels.shape[:2], -1), size)


def model_picture(source: bytes | Path, name: str, max_pixels: int | None, input_size: tuple[int, int]) -> np.ndarray:
    """The file in `source` as the model's uint8 RGB picture [H, W, 3] (C-contiguous) for `input_size`
    ([height, width]): decoded upright at the smallest size that still covers the input (see
    `decode_upright_rgb`; its `ImageError`s say what is wrong with the file), then `stretched`."""
    height, width = input_size
    return stretched(decode_upright_rgb(source, name, max_pixels, at_least=(width, height)), input_size)
