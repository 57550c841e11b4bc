"""The model picture's resize without torch (contract/resize.py): the same bytes as torch's uint8 antialiased
bilinear kernel, which torchvision's resize ran for training and the service before, for any sizes; and a picture
made without importing torch."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from contract.images import decode_upright_rgb
from contract.picture import model_picture, stretched
from contract.preprocess import decode_for_model
from contract.resize import antialiased_resize
from tests.conftest import SHARED_DATASETS
from tests.support.images import drawn_image, encode

REPO = Path(__file__).resolve().parents[2]
MODEL_SIZES = ((224, 224), (128, 128), (224, 160))


def _torch_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's uint8 kernel (the one torchvision's resize calls for uint8 on x86 CPUs with AVX2 or AVX-512 and
    on ARM; AVX2, AVX-512 and generic builds agree): [H, W, C] to [h, w, C]."""
    tensor = torch.tensor(pixels).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(tensor, size=list(size), mode="bilinear", antialias=True,
                                              align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()


def _content(kind: str, generator: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    if kind == "noise":
        return generator.integers(0, 256, shape, dtype=np.uint8)
    if kind == "white":  # weights that sum above 1 round 255 up to 256: torch clamps
        return np.full(shape, 255, np.uint8)
    if kind == "checkerboard":  # the most aliasing: every sample the opposite extreme of its neighbours
        rows, columns = np.indices(shape[:2])
        return np.repeat((((rows + columns) % 2) * 255).astype(np.uint8)[:, :, None], shape[2], axis=2)
    rows, columns = np.indices(shape[:2])  # a smooth gradient, per channel in another direction
    ramps = [rows * 255 // max(1, shape[0] - 1), columns * 255 // max(1, shape[1] - 1),
             (rows + columns) * 255 // max(1, shape[0] + shape[1] - 2)]
    return np.stack([ramps[channel % 3] for channel in range(shape[2])], axis=2).astype(np.uint8)


def _sizes(generator: np.random.Generator) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(input, output) [height, width] pairs: edge cases, what decoding leaves for the model sizes, and random
    ones, shrinking and enlarging, square and not."""
    cases = [((1, 1), (1, 1)), ((1, 1), (7, 5)), ((9, 13), (1, 1)), ((1, 300), (1, 224)), ((300, 1), (224, 1)),
             ((2000, 7), (3, 224)), ((3, 5), (500, 400)), ((224, 224), (224, 224)), ((224, 300), (224, 224)),
             ((300, 224), (224, 224)), ((2, 2), (3, 3)), ((3, 3), (2, 2))]
    for height, width in MODEL_SIZES:  # decoding leaves each side between 1 and 4 times the input's
        for _ in range(6):
            cases.append(((int(generator.integers(height, 4 * height)), int(generator.integers(width, 4 * width))),
                          (height, width)))
    for low, high in ((1, 12), (1, 600), (100, 900)):
        for _ in range(25):
            cases.append((tuple(int(side) for side in generator.integers(low, high, 2)),
                          tuple(int(side) for side in generator.integers(low, high, 2))))
    return cases


def test_the_resize_is_torchs_to_the_bit_for_any_sizes_contents_and_channels() -> None:
    generator = np.random.default_rng(22)
    kinds = ("noise", "white", "checkerboard", "gradient")
    for index, (in_size, out_size) in enumerate(_sizes(generator)):
        channels = (3, 3, 1, 4)[index % 4]
        pixels = _content(kinds[index % len(kinds)], generator, (*in_size, channels))
        resized = antialiased_resize(pixels, out_size)
        assert resized.dtype == np.uint8 and resized.shape == (*out_size, channels) and resized.flags.c_contiguous
        expected = _torch_resize(pixels, out_size)
        different = resized != expected
        assert not different.any(), (f"{in_size} -> {out_size}, {channels} channels, {kinds[index % len(kinds)]}: "
                                     f"{int(different.sum())} samples differ, by up to "
                                     f"{int(np.abs(resized.astype(int) - expected).max())}")


def test_views_of_an_array_resize_like_their_copies() -> None:
    """A crop, flipped channels, a stride and a transposition: not contiguous, which OpenCV's transpose and the
    matrix products must read right."""
    pixels = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for view in (pixels[10:250, 7:390], pixels[:, :, ::-1], pixels[::2, ::3], pixels.transpose(1, 0, 2)):
        for size in ((100, 120), (view.shape[0], 50), (50, view.shape[1])):
            assert np.array_equal(antialiased_resize(view, size), _torch_resize(np.ascontiguousarray(view), size))


def test_huge_reductions_keep_torchs_weights_at_their_most_precise() -> None:
    """Reductions beyond 256 times reach the most bits torch gives a weight (22): with 21 or 23, a few of these
    samples round the other way."""
    generator = np.random.default_rng(11)
    for in_size, out_size in (((3000, 400), (2, 400)), ((400, 5000), (400, 7))):
        pixels = generator.integers(0, 256, (*in_size, 3), dtype=np.uint8)
        assert np.array_equal(antialiased_resize(pixels, out_size), _torch_resize(pixels, out_size)), in_size


def test_a_12_megapixel_photo_resizes_to_the_bit_in_chunks_of_rows() -> None:
    """The width pass of a photo this large runs in chunks of rows, each sum in float64 (a 17x reduction makes
    sums too large for float32's integers)."""
    pixels = np.asarray(drawn_image(3, (400, 300)).resize((4000, 3000), Image.Resampling.BICUBIC))
    for size in ((224, 224), (128, 96)):
        assert np.array_equal(antialiased_resize(pixels, size), _torch_resize(pixels, size)), size


_TORCHVISION_RESIZES_UINT8 = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                              or platform.machine() in ("aarch64", "arm64"))


@pytest.mark.skipif(not _TORCHVISION_RESIZES_UINT8,
                    reason="on an x86 CPU without AVX2 torchvision resizes uint8 pictures in float32 instead of "
                           "torch's uint8 kernel, up to 1 level away from it (and from what this project trained on)")
def test_the_resize_is_what_torchvision_computed_for_the_model_before() -> None:
    """contract/preprocess.py called torchvision's resize on the [3, H, W] tensor of the decoded picture."""
    generator = np.random.default_rng(7)
    for height, width in MODEL_SIZES:
        for in_size in ((height, width), (2 * height + 1, 3 * width - 5), (4 * height - 1, width + 3)):
            pixels = generator.integers(0, 256, (*in_size, 3), dtype=np.uint8)
            before = F.resize(torch.from_numpy(pixels).permute(2, 0, 1), [height, width], antialias=True)
            assert np.array_equal(antialiased_resize(pixels, (height, width)), before.permute(1, 2, 0).numpy())


def _dataset_photos() -> list[Path]:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the photos are in {SHARED_DATASETS}, which is absent; the generated images are still compared")
    photos = sorted((SHARED_DATASETS / "fullsize").glob("*.jpg"))
    for folder in ("flowers", "airbnb", "skin_cancer"):
        photos += sorted((SHARED_DATASETS / folder).rglob("*.jpg"))[::97]  # a spread over classes and sizes
    return photos


def test_real_photos_make_the_pictures_they_made_before() -> None:
    for path in _dataset_photos():
        for height, width in MODEL_SIZES:
            decoded = decode_upright_rgb(path, path.name, None, at_least=(width, height))
            before = _torch_resize(np.asarray(decoded), (height, width))
            picture = model_picture(path, path.name, None, (height, width))
            assert np.array_equal(picture, before), (path.name, decoded.size, (height, width))
            tensor = decode_for_model(path, path.name, None, (height, width))
            assert tensor.dtype == torch.uint8 and tensor.shape == (3, height, width)
            assert np.array_equal(tensor.permute(1, 2, 0).numpy(), before), path.name


def test_a_front_process_makes_the_model_picture_without_importing_torch(tmp_path: Path) -> None:
    path = tmp_path / "drawn.jpg"
    path.write_bytes(encode(drawn_image(5, (300, 200)), "JPEG", quality=90))
    script = ("import sys; from contract.picture import model_picture; "
              f"picture = model_picture(open({str(path)!r}, 'rb').read(), 'image', None, (224, 160)); "
              "loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'torchvision')); "
              "print(picture.dtype, picture.shape, picture.flags.c_contiguous, loaded)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["uint8", "(224,", "160,", "3)", "True", "[]"], done.stdout + done.stderr
    expected = _torch_resize(np.asarray(decode_upright_rgb(path, at_least=(160, 224))), (224, 160))
    assert np.array_equal(model_picture(path, "image", None, (224, 160)), expected)


@pytest.mark.parametrize("pixels, size", [
    (np.zeros((4, 4, 3), np.float32), (2, 2)),
    (np.zeros((4, 4), np.uint8), (2, 2)),
    (np.zeros((4, 4, 5), np.uint8), (2, 2)),
    (np.zeros((4, 4, 3), np.uint8), (0, 2)),
    (np.zeros((0, 4, 3), np.uint8), (2, 2)),
], ids=["float", "no-channel-axis", "five-channels", "zero-height-asked", "empty-picture"])
def test_what_the_resize_cannot_take_is_refused_with_the_reason(pixels: np.ndarray, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="expected uint8 pixels|every side must be >= 1"):
        antialiased_resize(pixels, size)


def test_a_grayscale_image_is_resized_as_one_channel() -> None:
    image = drawn_image(9, (150, 90)).convert("L")
    resized = stretched(image, (64, 48))
    assert resized.shape == (64, 48, 1)
    assert np.array_equal(resized, _torch_resize(np.asarray(image)[:, :, None], (64, 48)))
