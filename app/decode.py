"""Uploaded bytes to an upright RGB picture, refusing what is not an image, broken, or too large to decode."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import Problem

# Modes holding more than 8 bits per sample; Pillow's convert("RGB") would clip them instead of scaling.
_WIDE_GRAYSCALE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The first frame of the image in `data`, EXIF orientation applied, as RGB (transparency over white)."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below twice its limit; ours, below, is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(field, max_pixels) from error
    except UnidentifiedImageError as error:
        raise Problem(
            415, "not-an-image",
            f"{field} is not an image Pillow can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file.",
        ) from error
    except MemoryError:
        raise
    except Exception as error:  # recognised, but its header is damaged: Pillow raises anything (OSError, ...)
        raise _corrupt(field, error) from error
    width, height = image.size
    # Checked on the header's size, before a single pixel is decoded.
    if width * height > max_pixels:
        raise _too_many_pixels(field, max_pixels, width, height)
    try:
        image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright)
    except Image.DecompressionBombError as error:  # a GIF frame larger than the header said
        raise _too_many_pixels(field, max_pixels) from error
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise many classes (OSError, struct.error, IndexError, ...)
        raise _corrupt(field, error) from error


def _corrupt(field: str, error: Exception) -> Problem:
    return Problem(
        422, "corrupt-image",
        f"{field} could not be decoded ({str(error) or type(error).__name__}); the file is truncated or damaged, "
        "send it again.",
    )


def _too_many_pixels(field: str, max_pixels: int, width: int | None = None, height: int | None = None) -> Problem:
    size = f" ({width} x {height} pixels)" if width else ""
    return Problem(
        422, "image-too-large",
        f"{field} is too large{size}: the limit is {max_pixels:,} pixels; send a smaller image.",
    )


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
