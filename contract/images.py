"""Uploaded bytes or image files to an upright RGB picture, refusing what is not an image, broken, or too large.

The service decodes uploads with it and training decodes its datasets with it, so both see the same pixels.
Failures are domain errors (`ImageError` and its kinds); the service maps them to HTTP answers in one place.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Modes holding more than 8 bits per sample; Pillow's convert("RGB") would clip them instead of scaling.
_WIDE_GRAYSCALE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# Modes whose samples can be box-averaged before the conversion to RGB (palette indices, 16-bit samples and
# alpha cannot), which then runs on the small picture.
_REDUCIBLE_MODES = {"L", "RGB"}
EXIF_ORIENTATION = 0x0112
# What ImageOps.exif_transpose does, applied here after shrinking, so that the full-size picture is never turned.
_UPRIGHT_TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = {5, 6, 7, 8}


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


def decode_upright_rgb(source: bytes | Path, name: str = "image", max_pixels: int | None = None,
                       at_least: tuple[int, int] | None = None) -> Image.Image:
    """The first frame of the image in `source`, EXIF orientation applied, as RGB (transparency over white).

    `max_pixels` (width x height) is checked on the header, before a single pixel is decoded. With `at_least`
    (upright width, height), the picture is only decoded about as large as needed, for the caller's final
    resize: a JPEG is scaled down while it is decoded (Pillow's draft mode: 1/2, 1/4 or 1/8 in the DCT domain,
    the smallest scale at or above `at_least`), then any image is shrunk by whole factors per side while that
    side stays at least twice `at_least`. Each side ends at or above `at_least` (or at the original's size when
    that is smaller) and below 4 times it: a photo's full-size pixels never outlive this call, and a JPEG's
    never exist.
    """
    picture, _ = _decode(source, name, max_pixels, lambda upright: at_least)
    return picture


def header_pixels(source: bytes | Path, name: str, max_pixels: int | None) -> int:
    """Width x height from the image's header, checked against `max_pixels` as decoding does; no pixel is
    decoded (what the service charges to its budget of pixels in flight before decoding)."""
    with _open(source, name, max_pixels) as image:
        width, height = image.size
    return width * height


# The colour layouts a GPU's JPEG decoder turns into RGB as libjpeg does here (no CMYK, no Adobe YCCK).
_DEVICE_JPEG_MODES = {"RGB", "L"}
_END_OF_IMAGE = b"\xff\xd9"
# How far before a JPEG's end its end-of-image marker may stand (cameras append padding or trailers after it).
_TRAILER_BYTES = 4096


def device_jpeg_header(source: bytes, name: str, max_pixels: int | None) -> tuple[int, int | None]:
    """What `header_pixels` gives (width x height, `max_pixels` checked as decoding checks it), and for a JPEG
    that a GPU decoder can take whole (YCbCr or greyscale, its end-of-image marker present) its EXIF orientation (1
    to 8); None for any other file, which `decode_upright_rgb` decodes here and whose errors it reports. One look
    at the header; no pixel is decoded. A truncated JPEG stays on the CPU: libjpeg reports it as what it is, where a
    failed decode on the GPU would fail its batch (the others run again one by one)."""
    with _open(source, name, max_pixels) as image:
        width, height = image.size
        if image.format != "JPEG" or image.mode not in _DEVICE_JPEG_MODES or \
                _END_OF_IMAGE not in source[-_TRAILER_BYTES:]:
            return width * height, None
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # a damaged EXIF block: decoding here says what is wrong with it, as for any file
            return width * height, None
    return width * height, orientation if orientation in range(1, 9) else 1


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down (never up) so that the longest side is at most `max_side`, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_upright_rgb_fitted(source: bytes | Path, name: str, max_pixels: int | None,
                              max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_upright_rgb`'s picture at exactly `fitted_size(its size, max_side)`, as an RGB array [h, w, 3]:
    decoded only as large as that needs, then resized once; and the whole picture's upright (width, height)."""
    picture, upright = _decode(source, name, max_pixels, lambda upright: fitted_size(*upright, max_side))
    width, height = fitted_size(*upright, max_side)
    pixels = np.asarray(picture)
    if picture.size == (width, height):
        return pixels, upright
    # Decoding leaves less than twice the size for a JPEG (the next DCT scale down would be too small): there a
    # bilinear step, which then averages the two nearest samples, came within 1.32 grey levels of an area average
    # of the full-size picture (Pillow's antialiased resize: 2.21) in a tenth of the time or less (bench/RESULTS.md,
    # "Overlays and decoding of large photos").
    # Other formats are shrunk by whole factors to between 2 and 4 times the size: an area average.
    shrink = max(picture.width / width, picture.height / height)
    interpolation = cv2.INTER_LINEAR if shrink < 2 else cv2.INTER_AREA
    return cv2.resize(pixels, (width, height), interpolation=interpolation), upright


def _decode(source: bytes | Path, name: str, max_pixels: int | None,
            needed: Callable[[tuple[int, int]], tuple[int, int] | None]) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB picture, decoded as small as `needed(full upright size)` allows (None: full size), and
    the full upright size."""
    image = _open(source, name, max_pixels)
    try:
        image.seek(0)
        # A JPEG's EXIF is in its header; other formats' orientation may only be known after loading (Pillow loads
        # a PNG here for a late eXIf chunk), which they do before any shrinking anyway.
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        # Orientations 5 to 8 turn the picture by 90 degrees: the stored pixels have width and height swapped.
        swapped = orientation in SWAPS_SIDES
        upright = (image.height, image.width) if swapped else image.size
        at_least = needed(upright)
        stored_at_least = None if at_least is None else (at_least[::-1] if swapped else at_least)
        if stored_at_least is not None:
            image.draft("RGB", stored_at_least)
        image.load()
        if stored_at_least is not None and image.mode in _REDUCIBLE_MODES and "transparency" not in image.info:
            image = _reduced(image, stored_at_least)  # before the conversion, which then runs on fewer pixels
        picture = _to_rgb(image)
        if stored_at_least is not None:
            picture = _reduced(picture, stored_at_least)  # the other modes; a no-op after the step above
        transposition = _UPRIGHT_TRANSPOSITIONS.get(orientation)
        return (picture.transpose(transposition) if transposition is not None else picture), upright
    except Image.DecompressionBombError as error:  # e.g. a GIF frame larger than its header said
        raise _too_many_pixels(name, max_pixels) from error
    except MemoryError:
        raise
    except Exception as error:  # truncated or damaged data fails in Pillow's decoders with many exception types
        raise _corrupt(name, error) from error


def _open(source: bytes | Path, name: str, max_pixels: int | None) -> Image.Image:
    """The image file with its header read and checked against `max_pixels`; no pixel decoded yet."""
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
    return image


# Box-shrinking leaves at least this factor to the caller's final antialiased resize, as Pillow's thumbnail()
# does: shrinking all the way by whole factors blurs less than one antialiased resize, and moved a 12 Mpx photo's
# model input by 1 to 4 grey levels on average, against under 1 with this gap.
REDUCING_GAP = 2


def _reduced(image: Image.Image, at_least: tuple[int, int]) -> Image.Image:
    """`image` shrunk by whole factors per side (box average), each side kept >= REDUCING_GAP x `at_least`."""
    factors = tuple(max(1, side // (REDUCING_GAP * needed)) for side, needed in zip(image.size, at_least))
    return image.reduce(factors) if factors != (1, 1) else image


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
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") would copy an RGB picture
