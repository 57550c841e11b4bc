"""Whatever a client uploads gets a clear 4xx problem (never a 500), and the service keeps serving."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.support.images import class_image, drawn_image, encode, pair_files

GOOD = encode(class_image("red", 11), "PNG")


def _problem(response: httpx.Response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"] and body["title"]
    if slug is not None:
        assert body["type"] == f"urn:siamcam:problem:{slug}", body
    return body


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat_data = zlib.compress(b"\0" * 64)
    idat = struct.pack(">I", len(idat_data)) + b"IDAT" + idat_data + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat


BAD_PAIRS = {
    "text file": (b"this is not an image", 415, "not-an-image"),
    "empty file": (b"", 415, "not-an-image"),
    "truncated jpeg": (encode(drawn_image(12, (200, 150)), "JPEG")[:700], 422, "corrupt-image"),
    "truncated png": (encode(drawn_image(13, (200, 150)), "PNG")[:-2000], 422, "corrupt-image"),
    "decompression bomb": (_png_claiming_size(50_000, 50_000), 422, "image-too-large"),
    "over MAX_IMAGE_PIXELS": (_png_claiming_size(8000, 6000), 422, "image-too-large"),
}


@pytest.mark.parametrize("endpoint", ["/similarity", "/explain"])
@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_files_get_a_clear_problem(client: httpx.Client, endpoint: str, case: str) -> None:
    data, status, slug = BAD_PAIRS[case]
    body = _problem(client.post(endpoint, files=pair_files(GOOD, data)), status, slug)
    assert "image2" in body["detail"]  # says which upload is wrong


@pytest.mark.parametrize(
    ("files", "form", "mentions"),
    [
        ({"image1": ("a.png", GOOD)}, {}, "image2"),
        ({}, {}, "image1"),
        (pair_files(GOOD, GOOD), {"format": "gif"}, "format"),
        (pair_files(GOOD, GOOD), {"opacity": "1.5"}, "opacity"),
        (pair_files(GOOD, GOOD), {"colormap": "rainbow-unicorn"}, "colormap"),
        (pair_files(GOOD, GOOD), {"max_side": "zero"}, "max_side"),
        (pair_files(GOOD, GOOD), {"quality": "0"}, "quality"),
        (pair_files(GOOD, GOOD), {"quality": "101"}, "quality"),
    ],
)
def test_missing_fields_and_bad_options_get_422(client: httpx.Client, files: dict, form: dict, mentions: str) -> None:
    response = client.post("/explain", files=files or None, data=form or None,
                           headers={} if files else {"content-type": "multipart/form-data; boundary=x"})
    assert mentions in _problem(response, 422, "invalid-request")["detail"]


def _exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(image, "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [class_image(colour, 20, (50, 40)).convert("P") for colour in ("red", "green", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit_gray() -> bytes:
    ramp = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def _half_transparent() -> bytes:
    """A red shape whose left half is transparent: what shows is the white it is composited on."""
    picture = class_image("red", 17).convert("RGBA")
    alpha = np.full((picture.height, picture.width), 255, dtype=np.uint8)
    alpha[:, : picture.width // 2] = 0
    picture.putalpha(Image.fromarray(alpha))
    return encode(picture, "PNG")


UNUSUAL_IMAGES = {
    "grayscale": lambda: encode(class_image("red", 14).convert("L"), "PNG"),
    "palette": lambda: encode(class_image("red", 15).convert("P"), "PNG"),
    "cmyk jpeg": lambda: encode(class_image("red", 16).convert("CMYK"), "JPEG"),
    "alpha": _half_transparent,
    "animated gif": _animated_gif,
    "webp": lambda: encode(class_image("red", 18), "WEBP"),
    "bmp": lambda: encode(class_image("red", 19), "BMP"),
}


def _as_plain_rgb_png(data: bytes) -> bytes:
    """What the service must see of `data`: its first frame, in RGB, transparency composited on white."""
    picture = Image.open(io.BytesIO(data))
    picture.seek(0)
    if picture.mode in ("RGBA", "LA", "PA", "P") and (picture.mode != "P" or "transparency" in picture.info):
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(white, picture.convert("RGBA"))
    return encode(picture.convert("RGB"), "PNG")


@pytest.mark.parametrize("case", list(UNUSUAL_IMAGES))
def test_unusual_images_are_scored_as_their_pixels(client: httpx.Client, case: str) -> None:
    """Catches a decoder that reads an unusual file differently from its plain RGB pixels (CMYK left inverted,
    transparency shown instead of composited on white, a later frame of an animation, a palette's indices):
    each must score as the same picture saved as a plain RGB PNG."""
    unusual = UNUSUAL_IMAGES[case]()
    score = lambda data: client.post("/similarity", files=pair_files(GOOD, data)).json()["score"]  # noqa: E731
    assert score(unusual) == pytest.approx(score(_as_plain_rgb_png(unusual)), abs=1e-4)
    if case == "alpha":  # the check can tell: the hidden pixels shown instead score otherwise
        shown = encode(Image.open(io.BytesIO(unusual)).convert("RGB"), "PNG")
        assert abs(score(shown) - score(unusual)) > 0.02


def test_16_bit_images_are_scaled_not_clipped(client: httpx.Client) -> None:
    """A 16-bit ramp must look like the same ramp in 8 bits (clipping would make it almost all white)."""
    ramp16 = _sixteen_bit_gray()
    ramp8 = encode(Image.fromarray((np.linspace(0, 255, 80 * 60).reshape(60, 80)).astype(np.uint8)), "PNG")
    white = encode(Image.new("L", (80, 60), 255), "PNG")
    score = lambda data: client.post("/similarity", files=pair_files(GOOD, data)).json()["score"]  # noqa: E731
    assert score(ramp16) == pytest.approx(score(ramp8), abs=1e-3)
    assert score(ramp16) != pytest.approx(score(white), abs=1e-3)


def test_exif_orientation_is_applied(client: httpx.Client) -> None:
    """Catches a model input (not only an overlay) made from the stored pixels instead of the upright picture:
    tiny's heatmaps say where the shape is, and a red shape in the upright picture's corner is elsewhere in the
    stored one. The rotated file must be explained as the upright one, not as its stored pixels."""
    stored = class_image("red", 23, (120, 60))  # stored landscape, displayed portrait
    good = encode(class_image("red", 24, (96, 72)), "PNG")

    def factual_heatmap(second: bytes) -> tuple[np.ndarray, dict]:
        body = client.post("/explain", files=pair_files(good, second), data={"include_heatmaps": "true"}).json()
        overlay = body["explanations"]["factual"]["image2"]
        return np.array(overlay["heatmap"]), overlay

    rotated, overlay = factual_heatmap(_exif_rotated(stored))
    assert (overlay["width"], overlay["height"]) == (60, 120)
    upright, _ = factual_heatmap(encode(stored.transpose(Image.Transpose.ROTATE_270), "JPEG"))
    as_stored, _ = factual_heatmap(encode(stored, "JPEG"))  # what a service ignoring the tag would explain
    assert np.abs(rotated - upright).mean() < 0.03
    assert np.abs(as_stored - upright).mean() > 0.15  # the check above can tell the two apart


def test_service_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    for data, status, _ in BAD_PAIRS.values():
        assert client.post("/explain", files=pair_files(data, GOOD)).status_code == status
    assert client.post("/explain", files=pair_files(GOOD, GOOD)).status_code == 200
    assert client.get("/readyz").status_code == 200


LIMIT = 50_000  # MAX_UPLOAD_BYTES for the upload-size tests


def test_uploads_over_the_limit_get_413(serve: Callable[..., AbstractContextManager[str]]) -> None:
    big_file = np.random.default_rng(0).integers(0, 256, size=LIMIT + 1000, dtype=np.uint8).tobytes()
    with serve(max_upload_bytes=LIMIT) as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        # One file over the limit, the body as a whole within it: the file's own size is checked.
        _problem(client.post("/similarity", files=pair_files(GOOD, big_file)), 413, "content-too-large")
        # A body announced larger than the limit is refused from its Content-Length, before it is read.
        huge = big_file * 4
        _problem(client.post("/similarity", files=pair_files(huge, huge)), 413, "content-too-large")
        assert client.post("/similarity", files=pair_files(GOOD, GOOD)).status_code == 200


def test_a_streamed_body_is_cut_off_at_the_limit(test_settings: Callable[..., Settings]) -> None:
    """Without Content-Length (chunked), the body is read only up to the limit, not to its end."""
    settings = test_settings(max_upload_bytes=LIMIT)
    chunk = b"\0" * 16_384
    sent = 0

    async def endless_body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="image1"; filename="a"\r\n\r\n'
        for _ in range(1000):  # 16 MB if it were all read
            sent += len(chunk)
            yield chunk

    async def post() -> httpx.Response:
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                return await client.post("/similarity", content=endless_body(),
                                         headers={"content-type": "multipart/form-data; boundary=x"})

    response = asyncio.run(post())
    _problem(response, 413, "content-too-large")
    assert sent <= settings.max_body_bytes + 2 * len(chunk)
