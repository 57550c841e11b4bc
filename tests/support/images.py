"""Test images drawn with Pillow, and the multipart form the endpoints take."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def drawn_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A noisy background with a few coloured shapes: structure for the network to respond to."""
    generator = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(generator.integers(0, 120, size=(height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(generator.integers(0, width - 20)), int(generator.integers(0, height - 20))
        side = int(generator.integers(10, min(width, height) // 2))
        colour = tuple(int(v) for v in generator.integers(60, 256, size=3))
        (draw.ellipse if generator.random() < 0.5 else draw.rectangle)((x, y, x + side, y + side), fill=colour)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pair_files(first: bytes, second: bytes) -> dict[str, tuple[str, bytes]]:
    return {"image1": ("image1", first), "image2": ("image2", second)}


def phone_photo(seed: int, size: tuple[int, int] = (4000, 3000), orientation: int = 1,
                picture: Image.Image | None = None) -> bytes:
    """A JPEG the size of a phone camera's (12 Mpx by default): `picture` (else a drawn one) upscaled, with
    sensor-like noise so that the file is as large as a real photo's, and an EXIF orientation tag."""
    generator = np.random.default_rng(seed)
    width, height = size
    source = picture.convert("RGB") if picture is not None else drawn_image(seed, (width // 10, height // 10))
    upscaled = source.resize(size, Image.Resampling.BICUBIC)
    noise = generator.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    noisy = np.clip(np.asarray(upscaled, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    return encode(Image.fromarray(noisy), "JPEG", quality=90, exif=exif.tobytes())
