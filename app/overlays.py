"""Heatmaps drawn over the original images, encoded as PNG, JPEG or WebP."""

from __future__ import annotations

import io
from typing import Literal, get_args

import matplotlib
import numpy as np
from PIL import Image

OverlayFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A short list a client can offer in a menu; every name is one of matplotlib's colormaps.
ColormapName = Literal["jet", "turbo", "viridis", "inferno", "magma", "plasma", "cividis", "hot", "coolwarm", "gray"]
COLORMAPS: tuple[str, ...] = get_args(ColormapName)


def overlay_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The original's size, scaled down (never up) so that its longest side is at most `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [h, w] float map stretched bilinearly over `size` (width, height): the model saw the whole image."""
    resized = Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def render_overlay(
    original: Image.Image, heatmap: np.ndarray, colormap: str, opacity: float, max_side: int, fmt: OverlayFormat
) -> tuple[bytes, int, int]:
    """The encoded overlay of `heatmap` ([h, w] in [0, 1]) on the RGB `original`, with its width and height."""
    size = overlay_size(*original.size, max_side)
    background = np.asarray(original.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    colours = matplotlib.colormaps[colormap](resize_heatmap(heatmap, size))[..., :3] * 255.0
    blended = (1.0 - opacity) * background + opacity * colours
    picture = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt.upper(), **({"quality": 90} if fmt != "png" else {}))
    return buffer.getvalue(), size[0], size[1]
