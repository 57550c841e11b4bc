"""Heatmaps drawn over the original images with OpenCV, encoded as JPEG, WebP or PNG.

Each image's background is decoded once per request at overlay size (`overlay_background`); each of its
overlays then costs one resize of the small heatmap, one table lookup, one blend and one encode.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
from PIL import Image

from app.colormaps import BGR_LOOKUP_TABLES, COLORMAPS, ColormapName
from contract.images import decode_upright_rgb_fitted

__all__ = ["COLORMAPS", "DEFAULT_FORMAT", "DEFAULT_QUALITY", "MEDIA_TYPES", "ColormapName", "OverlayFormat",
           "Background", "overlay_background", "render_overlay"]

OverlayFormat = Literal["jpeg", "webp", "png"]
# Measured by bench/overlay_bench.py (bench/RESULTS.md): JPEG encodes many times faster than WebP (libwebp's
# default effort) and PNG; at quality 60 the four 1024 px overlays of even the most detailed photos we have stay
# under 600 kB of JSON, and look the same as at 90 next to each other.
DEFAULT_FORMAT: OverlayFormat = "jpeg"
DEFAULT_QUALITY = 60
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# libwebp's effort (0 to 6) for WebP through Pillow: OpenCV's WebP encoder has its fixed effort 4, which took
# 127 ms per 1024 px overlay against 46 ms at 2, for 5 % more bytes (bench/overlay_bench.py's photo).
_WEBP_METHOD = 2


class Background(NamedTuple):
    pixels: np.ndarray  # the upright original at overlay size, [height, width, 3] uint8, BGR (OpenCV's order)
    original_size: tuple[int, int]  # the whole original's upright (width, height): what boxes are measured in


def overlay_background(source: bytes | Path, name: str, max_pixels: int | None, max_side: int) -> Background:
    """The upright original at overlay size (its longest side at most `max_side`, never enlarged, aspect kept):
    decoded only as large as that size needs, resized once."""
    picture, original_size = decode_upright_rgb_fitted(source, name, max_pixels, max_side)
    return Background(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), original_size)


def render_overlay(background: np.ndarray, heatmap: np.ndarray, colormap: ColormapName, opacity: float,
                   fmt: OverlayFormat, quality: int) -> bytes:
    """`heatmap` ([h, w] in [0, 1], covering the whole image) stretched bilinearly over the BGR `background`,
    coloured through the colormap's table and blended with `opacity`; encoded (`quality` for JPEG and WebP)."""
    height, width = background.shape[:2]
    stretched = cv2.resize(heatmap.astype(np.float32, copy=False), (width, height), interpolation=cv2.INTER_LINEAR)
    # Table entry i is the colour of value i / 255: round to the nearest entry (saturating above 1).
    entries = cv2.convertScaleAbs(stretched, alpha=255.0)
    colours = cv2.applyColorMap(entries, BGR_LOOKUP_TABLES[colormap])
    return _encoded(cv2.addWeighted(background, 1.0 - opacity, colours, opacity, 0.0), fmt, quality)


def _encoded(picture: np.ndarray, fmt: OverlayFormat, quality: int) -> bytes:
    """The BGR `picture` as a file: JPEG and PNG by OpenCV (PNG at its default, fastest compression), WebP by
    Pillow."""
    if fmt == "webp":
        buffer = io.BytesIO()
        Image.fromarray(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)).save(buffer, "WEBP", quality=quality,
                                                                      method=_WEBP_METHOD)
        return buffer.getvalue()
    options = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else []
    encoded, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", picture, options)
    if not encoded:
        raise RuntimeError(f"OpenCV could not encode a {picture.shape[1]} x {picture.shape[0]} overlay as {fmt}")
    return data.tobytes()
