"""Truncated and bit-flipped images of every supported format get a 2xx or a 4xx problem, never a 500 or a
dropped connection, and the service stays ready and keeps scoring.

Each case mangles one real file (drawn pictures encoded here; real photos too when ../shared/datasets is there)
at offsets drawn from a seeded generator, so every run sends the same few hundred uploads.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.app.failing_model import FAILING_MODEL_NAME
from tests.support.images import drawn_image, encode, pair_files
from tests.conftest import SHARED_DATASETS

SEED = 20261130
CASES_PER_FILE = 36
HEADER_BYTES = 512  # half the flips land here, where the parsers' branches are
GOOD = encode(drawn_image(11), "PNG")
_BMP_COMPRESSION_OFFSET = 30  # BITMAPINFOHEADER's biCompression
_BMP_RLE8 = 1


def _with_exif_orientation(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate on display: exif_transpose runs on what survives the mangling
    return encode(image, "JPEG", exif=exif)


def _rle8_bmp(image: Image.Image) -> bytes:
    """`image` as an RLE8-compressed BMP, made by hand: Pillow reads this format but does not write it."""
    indexed = image.quantize(256)
    width, height = indexed.size
    rows = np.asarray(indexed, dtype=np.uint8)[::-1]  # BMP rows go bottom-up
    runs = bytearray()
    for row in rows:
        start = 0
        while start < width:
            end = start + 1
            while end < width and end - start < 255 and row[end] == row[start]:
                end += 1
            runs += bytes((end - start, row[start]))
            start = end
        runs += b"\0\0"  # end of line
    runs += b"\0\1"  # end of bitmap
    palette = bytes(indexed.getpalette() or []).ljust(768, b"\0")
    colour_table = b"".join(palette[i:i + 3][::-1] + b"\0" for i in range(0, 768, 3))  # BGR0
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, _BMP_RLE8, len(runs), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(colour_table)
    data = b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset) + info + colour_table + bytes(runs)
    with Image.open(io.BytesIO(data)) as decoded:  # a faithful file, or the mangling would prove nothing
        assert decoded.info.get("compression") == _BMP_RLE8
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(indexed.convert("RGB")))
    return data


def _in_every_format(image: Image.Image) -> dict[str, bytes]:
    return {
        "jpeg": _with_exif_orientation(image),
        "png": encode(image, "PNG"),
        "webp": encode(image, "WEBP"),
        "gif": encode(image.convert("P"), "GIF"),
        "tiff": encode(image, "TIFF", compression="tiff_lzw"),
        "bmp": encode(image, "BMP"),
        "bmp-rle8": _rle8_bmp(image),
    }


def _sources() -> dict[str, bytes]:
    sources = {f"drawn {fmt}": data for fmt, data in _in_every_format(drawn_image(51, (120, 90))).items()}
    photos = sorted((SHARED_DATASETS / "fullsize").glob("*.jpg"), key=lambda path: path.stat().st_size)
    if photos:  # the smallest photo, as taken and in every format; without them the drawn files still run
        sources["photo as taken"] = photos[0].read_bytes()
        with Image.open(photos[0]) as photo:
            sources.update({f"photo {fmt}": data for fmt, data in _in_every_format(photo.convert("RGB")).items()})
    return sources


SOURCES = _sources()


def _mangled(data: bytes, generator: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    for index in range(CASES_PER_FILE):
        if index % 2 == 0:
            cut = int(generator.integers(1, len(data)))
            yield f"cut at {cut}", data[:cut]
            continue
        region = min(HEADER_BYTES, len(data)) if index % 4 == 1 else len(data)
        offsets = sorted(int(offset) for offset in generator.integers(0, region, size=int(generator.integers(1, 4))))
        flipped = bytearray(data)
        for offset in offsets:
            flipped[offset] ^= int(generator.integers(1, 256))  # never 0: the byte always changes
        yield f"bytes changed at {offsets}", bytes(flipped)


@pytest.fixture(scope="module")
def http(serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path) -> Iterator[httpx.Client]:
    """One client, its connections kept alive across cases, so that a connection dropped after an answer shows.

    The service runs tests/app/failing_model.py's 32 x 32 model (it fails only on single-colour images, which
    mangling never makes): the time goes to decoding, what this module tests, not to resnet18.
    """
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, max_batch_wait_ms=0) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        yield client


def _status(client: httpx.Client, upload: bytes) -> tuple[int, str | None]:
    """The answer's status, and what is wrong with the answer (None if nothing); status 0: no answer."""
    try:
        response = client.post("/similarity", files=pair_files(GOOD, upload))
    except httpx.TransportError as error:
        return 0, f"no answer: {error!r}"
    status = response.status_code
    if 200 <= status < 300:
        return status, None
    if not 400 <= status < 500:
        return status, f"{status}: {response.text[:200]}"
    if response.headers["content-type"] != "application/problem+json":
        return status, f"{status} as {response.headers['content-type']}"
    return status, None


@pytest.mark.parametrize("source", list(SOURCES))
def test_mangled_images_get_2xx_or_a_4xx_problem(http: httpx.Client, source: str) -> None:
    generator = np.random.default_rng([SEED, list(SOURCES).index(source)])
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    for case, upload in _mangled(SOURCES[source], generator):
        status, problem = _status(http, upload)
        statuses[status] += 1
        if problem is not None:
            wrong.append(f"{case}: {problem}")
    assert not wrong, f"{len(wrong)} of {CASES_PER_FILE} mangled {source} files:\n" + "\n".join(wrong)
    assert statuses[422] > 0, f"no mangled {source} file was refused as corrupt: {statuses}"
    assert http.get("/readyz").status_code == 200
    assert http.post("/similarity", files=pair_files(GOOD, SOURCES[source])).status_code == 200


@pytest.mark.parametrize("source", ["drawn bmp", "drawn bmp-rle8"])
def test_every_bmp_compression_field_gets_2xx_or_a_4xx_problem(http: httpx.Client, source: str) -> None:
    """A header naming each compression BMP knows (RLE4, bit fields, JPEG, PNG, CMYK...) and one it does not."""
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    for compression in [*range(14), 0xFFFFFFFF]:
        variant = bytearray(SOURCES[source])
        variant[_BMP_COMPRESSION_OFFSET:_BMP_COMPRESSION_OFFSET + 4] = struct.pack("<I", compression)
        status, problem = _status(http, bytes(variant))
        statuses[status] += 1
        if problem is not None:
            wrong.append(f"compression {compression}: {problem}")
    assert not wrong, "\n".join(wrong)
    assert statuses[422] > 0, statuses
