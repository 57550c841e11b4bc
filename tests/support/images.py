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


# The classes the suite's small model (tests/support/colour_model.py) tells apart: one large shape of a primary
# colour on a dark noisy background.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {"red": (230, 30, 30), "green": (30, 220, 50), "blue": (40, 60, 240)}


def class_image(colour: str, seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A picture of the class `colour`: an ellipse or rectangle of that colour (a little varied), 60-70 % of the
    picture's width and height (so that it covers about the same share of any picture), at a random place on a
    noisy background."""
    generator = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(generator.integers(0, 120, size=(height, width, 3), dtype=np.uint8))
    fraction = generator.uniform(0.6, 0.7)
    shape_width, shape_height = round(width * fraction), round(height * fraction)
    x, y = int(generator.integers(0, width - shape_width + 1)), int(generator.integers(0, height - shape_height + 1))
    shade = np.clip(np.array(CLASS_COLOURS[colour]) + generator.integers(-12, 13, size=3), 0, 255)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if generator.random() < 0.5 else draw.rectangle)(
        (x, y, x + shape_width - 1, y + shape_height - 1), fill=tuple(int(v) for v in shade))
    return image


def class_pairs(count: int, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image], list[bool]]:
    """`count` pairs of class images, of one class (similar) at even indices and of two at odd ones, the classes
    taking turns: (firsts, seconds, same class?)."""
    colours = list(CLASS_COLOURS)
    firsts, seconds, same = [], [], []
    for index in range(count):
        first = colours[index % len(colours)]
        second = first if index % 2 == 0 else colours[(index + 1) % len(colours)]
        firsts.append(class_image(first, seed + 2 * index, (96, 72)))
        seconds.append(class_image(second, seed + 2 * index + 1, (80, 100)))
        same.append(first == second)
    return firsts, seconds, same


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
