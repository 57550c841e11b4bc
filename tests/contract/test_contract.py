"""The artifact contract: one manifest definition, TorchScript loading, and preprocessing that gives training and the
service the same tensors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.model import load_model
from contract.images import CorruptImage, NotAnImage, TooManyPixels, decode_upright_rgb
from contract.manifest import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, Manifest, ManifestError, read_manifest
from contract.preprocess import Preprocessing
from contract.torchscript import load_torchscript
from tests.support.images import drawn_image, encode
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


@pytest.mark.parametrize("make", [_photo_with_orientation, _translucent_png], ids=["exif-rotated-jpeg", "alpha-png"])
def test_training_and_the_service_turn_one_file_into_identical_tensors(make, model_store: Path,
                                                                       tmp_path: Path) -> None:
    data = make()
    path = tmp_path / "picture"
    path.write_bytes(data)
    served = load_model(model_store / "tiny", "cpu")
    from_service = served.preprocess(decode_upright_rgb(data, "image1", max_pixels=10**8))
    # training's evaluation path: images cached as uint8 by the data module, normalised per batch
    preprocessing = Preprocessing.of(read_manifest(model_store / "tiny"))
    from_training = preprocessing.normalize(decode_images([path], preprocessing.input_size))[0]
    assert from_service.dtype == torch.float32 and from_service.shape == (3, *served.input_size)
    assert torch.equal(from_service, from_training)


def test_decoding_stands_pictures_upright_and_puts_transparency_over_white() -> None:
    upright = decode_upright_rgb(_photo_with_orientation())
    assert upright.size == (80, 120) and upright.mode == "RGB"
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_upright_rgb(encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_decoding_refuses_what_it_cannot_use_with_domain_errors() -> None:
    with pytest.raises(NotAnImage, match="image1 is not an image"):
        decode_upright_rgb(b"%PDF-1.7 not a picture", "image1")
    with pytest.raises(TooManyPixels, match=r"\(120 x 80 pixels\): the limit is 9,000 pixels"):
        decode_upright_rgb(encode(drawn_image(1, (120, 80)), "PNG"), "image2", max_pixels=9000)
    with pytest.raises(CorruptImage, match="truncated or damaged"):
        decode_upright_rgb(encode(drawn_image(1, (120, 80)), "PNG")[:300], "image2")


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
