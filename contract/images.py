"""Uploaded bytes or image files to an upright RGB picture, refusing what is not an image, broken, or too large.

The service decodes uploads with it and training decodes its datasets with it, so both see the same pixels.
Failures are domain errors (`ImageError` and its kinds); the service maps them to HTTP answers in one place.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Modes holding more than 8 bits per sample; Pillow's convert("RGB") would clip them instead of scaling.
_WIDE_GRAYSCALE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used; `name` says which one (an upload field or a file), the message what to do."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class NotAnImage(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class TooManyPixels(ImageError):
    pass


def decode_upright_rgb(source: bytes | Path, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """The first frame of the image in `source`, EXIF orientation applied, as RGB (transparency over white).

    `max_pixels` (width x height) is checked on the header, before a single pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below twice its limit; `max_pixels` is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(name, max_pixels) from error
    except UnidentifiedImageError as error:
        raise NotAnImage(name, f"{name} is not an image Pillow can read; send a {SUPPORTED_FORMATS} file.") from error
    except MemoryError:
        raise
    except Exception as error:  # a damaged header can fail in any of Pillow's format plugins, in any way
        raise _corrupt(name, error) from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise _too_many_pixels(name, max_pixels, width, height)
    try:
        image.seek(0)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:  # e.g. a GIF frame larger than its header said
        raise _too_many_pixels(name, max_pixels) from error
    except MemoryError:
        raise
    except Exception as error:  # truncated or damaged data fails in Pillow's decoders with many exception types
        raise _corrupt(name, error) from error


def _corrupt(name: str, error: Exception) -> CorruptImage:
    reason = str(error) or type(error).__name__
    return CorruptImage(name, f"{name} could not be decoded ({reason}); the file is truncated or damaged, send it "
                              "again.")


def _too_many_pixels(name: str, max_pixels: int | None, width: int | None = None,
                     height: int | None = None) -> TooManyPixels:
    size = f" ({width} x {height} pixels)" if width else ""
    limit = f"the limit is {max_pixels:,} pixels" if max_pixels else "Pillow refuses it as a decompression bomb"
    return TooManyPixels(name, f"{name} is too large{size}: {limit}; send a smaller image.")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_GRAYSCALE_MODES:
        samples = np.asarray(image, dtype=np.float64)
        # 16-bit modes span 0..65535; 32-bit "I" has no declared range, so guess from the data.
        wide = image.mode != "I" or samples.max(initial=0) > 255
        peak = 65535.0 if wide else 255.0
        return Image.fromarray(np.clip(samples * (255.0 / peak), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image) * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
