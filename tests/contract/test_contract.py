"""The artifact contract: one manifest definition, TorchScript loading, and preprocessing that gives training and the
service the same tensors."""

from __future__ import annotations

import functools
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.model import load_model
from contract.images import (
    CorruptImage, NotAnImage, TooManyPixels, decode_upright_rgb, decode_upright_rgb_fitted, fitted_size,
    header_pixels,
)
from contract.manifest import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, Manifest, ManifestError, read_manifest
from contract.preprocess import Preprocessing, decode_for_model, resize_to
from contract.torchscript import load_torchscript
from tests.support.images import drawn_image, encode, phone_photo
from training.data import decode_images

REPO = Path(__file__).resolve().parents[2]
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise to stand upright


def _photo_with_orientation() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    return encode(drawn_image(7, (120, 80)), "JPEG", quality=92, exif=exif.tobytes())


def _translucent_png() -> bytes:
    picture = drawn_image(8, (90, 110)).convert("RGBA")
    picture.putalpha(Image.linear_gradient("L").resize(picture.size))
    return encode(picture, "PNG")


@functools.cache
def _large_rotated_photo() -> bytes:
    """12 Mpx stored landscape, shown portrait: decoding it for the model takes the JPEG draft path."""
    return phone_photo(9, (4000, 3000), orientation=ROTATED_90)


@functools.cache
def _large_png() -> bytes:
    return encode(Image.open(io.BytesIO(phone_photo(10, (2400, 1800)))), "PNG")


@pytest.mark.parametrize("make", [_photo_with_orientation, _translucent_png, _large_rotated_photo],
                         ids=["exif-rotated-jpeg", "alpha-png", "12-megapixel-exif-rotated-jpeg"])
def test_training_and_the_service_turn_one_file_into_identical_tensors(make, model_store: Path,
                                                                       tmp_path: Path) -> None:
    data = make()
    path = tmp_path / "picture"
    path.write_bytes(data)
    served = load_model(model_store / "tiny", "cpu")
    # the service's path: a uint8 picture per upload, normalised a batch at a time by the model's batch runners
    from_service = served.picture(data, "image1", max_pixels=10**8)
    # training's evaluation path: images cached as uint8 by the data module, normalised per batch
    preprocessing = Preprocessing.of(read_manifest(model_store / "tiny"))
    cached = decode_images([path], preprocessing.input_size)
    assert from_service.dtype == torch.uint8 and from_service.shape == (3, *served.input_size)
    assert torch.equal(from_service, cached[0])
    assert torch.equal(served.preprocessing.normalize(torch.stack([from_service, from_service]))[1],
                       preprocessing.normalize(cached)[0])


@pytest.mark.parametrize("input_size", [(128, 128), (224, 64)], ids=["square", "tall"])
@pytest.mark.parametrize("make", [_large_rotated_photo, _large_png], ids=["rotated-jpeg", "png"])
def test_decoding_for_the_model_never_holds_the_full_size_picture(make, input_size: tuple[int, int]) -> None:
    """What is decoded covers the input (height, width) and stays under 4 times its size per side (a 2x gap is
    left to the final antialiased resize): no full-size array survives decoding. A non-square input catches a
    size asked for in the wrong orientation."""
    height, width = input_size
    decoded = decode_upright_rgb(make(), at_least=(width, height))
    assert width <= decoded.width < 4 * width and height <= decoded.height < 4 * height, decoded.size


@pytest.mark.parametrize("input_size", [(128, 128), (224, 160)])
def test_a_12_megapixel_jpeg_decodes_for_the_model_close_to_full_decoding(input_size: tuple[int, int]) -> None:
    data = _large_rotated_photo()
    reduced = decode_for_model(data, "image1", None, input_size).float()
    full = resize_to(decode_upright_rgb(data), input_size).float()
    assert reduced.shape == full.shape == (3, *input_size)
    difference = (reduced - full).abs()
    # DCT-domain scaling is close to an antialiased resize (measured: 0.3 to 0.8 grey levels on average, 1 to 3
    # at the 99th percentile); a picture turned the wrong way or shifted would differ by tens of levels.
    assert difference.mean() < 1.5, float(difference.mean())
    assert torch.quantile(difference, 0.99) < 8, float(torch.quantile(difference, 0.99))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_fitted_decode_has_the_upright_aspect_ratio_at_the_asked_size(fmt: str) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    data = encode(drawn_image(12, (1500, 600)), fmt, exif=exif.tobytes())  # shown 600 x 1500
    fitted, original_size = decode_upright_rgb_fitted(data, "image1", None, 100)
    assert fitted.shape == (100, 40, 3) and fitted_size(600, 1500, 100) == (40, 100)
    assert original_size == (600, 1500)
    reference = np.asarray(decode_upright_rgb(data).resize((40, 100), Image.Resampling.BOX), dtype=float)
    assert np.abs(fitted - reference).mean() < 3
    small, _ = decode_upright_rgb_fitted(data, "image1", None, 4000)  # never enlarged
    assert small.shape == (1500, 600, 3)


def test_decoding_stands_pictures_upright_and_puts_transparency_over_white() -> None:
    upright = decode_upright_rgb(_photo_with_orientation())
    assert upright.size == (80, 120) and upright.mode == "RGB"
    stored = Image.open(io.BytesIO(_photo_with_orientation())).convert("RGB")
    assert upright.tobytes() == stored.transpose(Image.Transpose.ROTATE_270).tobytes()
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_upright_rgb(encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_decoding_refuses_what_it_cannot_use_with_domain_errors() -> None:
    with pytest.raises(NotAnImage, match="image1 is not an image"):
        decode_upright_rgb(b"%PDF-1.7 not a picture", "image1")
    with pytest.raises(TooManyPixels, match=r"\(120 x 80 pixels\): the limit is 9,000 pixels"):
        decode_upright_rgb(encode(drawn_image(1, (120, 80)), "PNG"), "image2", max_pixels=9000)
    with pytest.raises(CorruptImage, match="truncated or damaged"):
        decode_upright_rgb(encode(drawn_image(1, (120, 80)), "PNG")[:300], "image2")


def test_header_pixels_are_the_stored_size_checked_like_decoding() -> None:
    # EXIF-rotated: the stored width x height is what decoding will hold, whichever way up the picture stands.
    assert header_pixels(phone_photo(1, (400, 300), orientation=6), "image1", None) == 400 * 300
    with pytest.raises(TooManyPixels, match=r"\(120 x 80 pixels\): the limit is 9,000 pixels"):
        header_pixels(encode(drawn_image(1, (120, 80)), "PNG"), "image2", max_pixels=9000)
    with pytest.raises(NotAnImage, match="image1 is not an image"):
        header_pixels(b"%PDF-1.7 not a picture", "image1", None)


def test_the_committed_default_manifest_validates_and_round_trips() -> None:
    folder = REPO / "model_store" / "flowers"
    if not (folder / "manifest.json").is_file():
        pytest.skip(f"no default model at {folder}: train it with `make default-model`")
    manifest = read_manifest(folder)
    assert manifest.format_version in SUPPORTED_FORMAT_VERSIONS
    assert json.loads(manifest.model_dump_json()) == json.loads((folder / "manifest.json").read_text())


def _write(folder: Path, raw: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return folder


def test_invalid_manifests_are_refused_naming_the_file_and_the_field(model_store: Path, tmp_path: Path) -> None:
    good = json.loads((model_store / "tiny" / "manifest.json").read_text())
    assert isinstance(read_manifest(model_store / "tiny"), Manifest)
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(ManifestError, match="is not readable JSON"):
        read_manifest(_write(tmp_path / "json", "{not json"))
    with pytest.raises(ManifestError, match="format_version 99; this version of siamcam reads versions 1 and 2"):
        read_manifest(_write(tmp_path / "version", {**good, "format_version": 99}))
    without_size = {key: value for key, value in good.items() if key != "input_size"}
    with pytest.raises(ManifestError, match=r"input_size: Field required"):
        read_manifest(_write(tmp_path / "size", without_size))
    with pytest.raises(ManifestError, match=r"normalization\.std\.1: Input should be greater than 0"):
        read_manifest(_write(tmp_path / "std", {**good, "normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}))
    with pytest.raises(ManifestError, match=r"resize_policy: Input should be 'stretch'"):
        read_manifest(_write(tmp_path / "policy", {**good, "resize_policy": "crop"}))


def test_loading_torchscript_prints_no_deprecation_warning(model_store: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_torchscript(model_store / "tiny" / "model.pt", FORMAT_VERSION)
    assert not [warning for warning in caught if "deprecated" in str(warning.message)]
    assert not module.training
