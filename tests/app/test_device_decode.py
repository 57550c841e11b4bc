"""DECODE_DEVICE=cuda without a GPU: which uploads a front leaves undecoded, the pictures app/device_decode.py makes
of them (run here on the CPU, through torchvision's CPU decoder: the same code but the decoder), their places in a
batch, and their trip through the front/owner connection. (The start-up that refuses the setting without a GPU:
tests/app/test_lifecycle.py.)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.admission import ImageWork, PixelBudget
from app.device_decode import decode_pictures
from app.errors import Problem
from app.inference import Upload, admit_and_decode
from app.ipc import PictureSlots, encode, map_front_pictures, picture_references, receive, referenced_pictures
from app.jobs import SIMILARITY_QUEUE, EncodedJpeg, JobPicture
from app.model import load_model, score_pairs
from app.model_owner import running_model_owner
from app.owner_client import OwnerClient, connected_owner
from app.owner_server import OwnerServer
from app.settings import Settings
from contract.images import CorruptImage, TooManyPixels, device_jpeg_header
from contract.picture import model_picture
from tests.app.conftest import TEST_MODEL_NAME
from tests.support.images import class_image, drawn_image, encode as encode_image, pair_files, phone_photo
from tests.support.service import running_service

INPUT_SIZE = (224, 224)
CPU = torch.device("cpu")
# A photo that draft mode decodes at 1/4, then box-shrinks: the CPU path's every step is emulated.
PHOTO_SIZE = (1800, 1200)


def on_the_device(data: bytes, name: str = "image1") -> EncodedJpeg:
    """What a front sends for `data` with DECODE_DEVICE=cuda; the header must say the GPU can take it."""
    _, orientation = device_jpeg_header(data, name, max_pixels=None)
    assert orientation is not None, "a JPEG the GPU takes"
    return EncodedJpeg(name, np.frombuffer(data, dtype=np.uint8), orientation)


def fine_stripes() -> bytes:
    """A JPEG of stripes three pixels wide, 1800 x 1200: a pattern whose picture depends on how it is shrunk."""
    stripes = np.tile((np.arange(PHOTO_SIZE[0]) % 3 * 120).astype(np.uint8)[None, :, None], (PHOTO_SIZE[1], 1, 3))
    return encode_image(Image.fromarray(stripes), "JPEG", quality=90)


def mean_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_comes_out_upright_and_within_a_grey_level_of_the_cpu_picture(orientation: int) -> None:
    """Catches a turn or flip other than Pillow's for an EXIF orientation, sides swapped for the shrinking, and a
    shrinking other than draft mode's: each moves the picture by far more than the decoders' rounding."""
    data = phone_photo(orientation, PHOTO_SIZE, orientation=orientation)
    expected = model_picture(data, "image1", None, INPUT_SIZE).transpose(2, 0, 1)
    (picture,) = decode_pictures([on_the_device(data)], INPUT_SIZE, CPU).numpy()
    assert picture.shape == (3, *INPUT_SIZE) and picture.dtype == np.uint8
    assert mean_difference(picture, expected) < 1.0
    # The same file seen under the other orientations: what a wrong transposition would give.
    for other in set(range(1, 9)) - {orientation}:
        turned = EncodedJpeg("image1", np.frombuffer(data, dtype=np.uint8), other)
        (wrong,) = decode_pictures([turned], INPUT_SIZE, CPU).numpy()
        assert mean_difference(wrong, expected) > 10 * mean_difference(picture, expected) + 1


def test_a_fine_pattern_is_shrunk_as_draft_mode_shrinks_it() -> None:
    """Catches a resize straight from the full-size picture, skipping the emulation of the DCT scaling and the box
    shrinking: stripes three pixels wide then come out 3.7 grey levels away on average."""
    data = fine_stripes()
    expected = model_picture(data, "image1", None, INPUT_SIZE).transpose(2, 0, 1)
    (picture,) = decode_pictures([on_the_device(data)], INPUT_SIZE, CPU).numpy()
    assert mean_difference(picture, expected) < 0.5


def test_a_picture_draft_mode_leaves_whole_is_the_cpu_picture() -> None:
    """Smaller than twice the input, a JPEG is decoded whole on both paths and resized by the same resize."""
    data = encode_image(drawn_image(3, (300, 260)), "JPEG", quality=92)
    expected = model_picture(data, "image1", None, INPUT_SIZE).transpose(2, 0, 1)
    (picture,) = decode_pictures([on_the_device(data)], INPUT_SIZE, CPU).numpy()
    assert np.abs(picture.astype(np.int16) - expected).max() <= 1


def test_a_front_sends_only_whole_ycbcr_and_grey_jpegs() -> None:
    """Everything else is decoded on the CPU, where its errors say what is wrong with the file."""
    photo = encode_image(drawn_image(1, (200, 150)), "JPEG", quality=90)
    assert device_jpeg_header(photo, "image1", None) == (200 * 150, 1)
    assert device_jpeg_header(phone_photo(1, (400, 300), orientation=6), "image1", None) == (400 * 300, 6)
    assert device_jpeg_header(encode_image(drawn_image(1).convert("L"), "JPEG"), "image1", None)[1] == 1
    assert device_jpeg_header(encode_image(drawn_image(1), "PNG"), "image1", None)[1] is None
    assert device_jpeg_header(encode_image(drawn_image(1).convert("CMYK"), "JPEG"), "image1", None)[1] is None
    assert device_jpeg_header(photo[:len(photo) // 2], "image1", None)[1] is None  # truncated
    with pytest.raises(TooManyPixels, match="image1"):
        device_jpeg_header(photo, "image1", max_pixels=200 * 150 - 1)


def test_a_jpeg_the_decoder_refuses_fails_naming_its_upload() -> None:
    good = on_the_device(encode_image(drawn_image(1, (200, 150)), "JPEG"), "image1")
    broken = EncodedJpeg("image2", np.frombuffer(b"\xff\xd8\xff\xe0 not a JPEG at all \xff\xd9", np.uint8), 1)
    with pytest.raises(CorruptImage, match="image2 could not be decoded") as refused:
        decode_pictures([good, broken], INPUT_SIZE, CPU)
    assert refused.value.name == "image2"


def _pictures(seed: int, colour: str, input_size: tuple[int, int]) -> tuple[EncodedJpeg, np.ndarray]:
    """One drawn JPEG, as a front with DECODE_DEVICE=cuda sends it, and the picture the device makes of it."""
    jpeg = on_the_device(encode_image(class_image(colour, seed, (200, 160)), "JPEG", quality=90))
    return jpeg, decode_pictures([jpeg], input_size, CPU)[0].numpy()


def test_jpegs_decoded_in_a_batch_keep_their_places_among_decoded_pictures(model_store: Path) -> None:
    """Catches a JPEG's picture put in another pair's place: the scores differ from pair to pair, and each must be
    the score of its own pair of pictures."""
    model = load_model(model_store / TEST_MODEL_NAME, "cpu")
    made = [_pictures(seed, colour, model.input_size)
            for seed, colour in enumerate(("red", "blue", "red", "green", "blue", "red"))]
    firsts, seconds = made[0::2], made[1::2]
    expected = score_pairs(model, [picture for _, picture in firsts], [picture for _, picture in seconds])
    assert len({round(score, 4) for score in expected}) == 3
    mixed1 = [firsts[0][0], firsts[1][1], firsts[2][0]]
    mixed2 = [seconds[0][1], seconds[1][0], seconds[2][0]]
    assert score_pairs(model, mixed1, mixed2) == pytest.approx(expected, abs=1e-6)


def test_a_submit_message_carries_jpegs_as_files_and_pictures_as_slots() -> None:
    """The front's side of a submit and the owner's reading of it, through the real encoding."""
    slots = PictureSlots(4, (3, 8, 8))
    try:
        picture = np.full((3, 8, 8), 7, dtype=np.uint8)
        jpeg = EncodedJpeg("image2", np.frombuffer(b"\xff\xd8 file \xff\xd9", np.uint8), 6)
        files: list[np.ndarray] = []
        references = picture_references((picture, jpeg), slots.take([picture]), files)

        async def read_back() -> tuple[dict, list[np.ndarray]]:
            reader = asyncio.StreamReader()
            reader.feed_data(encode({"op": "submit", "pictures": [references]}, files))
            reader.feed_eof()
            return await receive(reader)

        message, arrays = asyncio.run(read_back())
        owner_view = map_front_pictures(os.getpid(), slots.fd, slots.count, slots.shape)
        first, second = referenced_pictures(message["pictures"][0], owner_view, arrays)
        assert np.array_equal(first, picture)
        assert isinstance(second, EncodedJpeg) and (second.name, second.orientation) == ("image2", 6)
        assert second.data.tobytes() == jpeg.data.tobytes()
    finally:
        slots.close()


def test_an_image_error_in_the_owner_reaches_the_front_as_that_error() -> None:
    """A JPEG the owner's GPU could not decode answers 422 from a front, as from one process, not 500."""
    failed = {"op": "failed", "id": 1, "stopped": False, "error": "image2 could not be decoded (bad data)",
              "image_error": {"kind": "CorruptImage", "name": "image2"}}
    error = OwnerClient._result(failed, [])
    assert isinstance(error, CorruptImage) and error.name == "image2" and "bad data" in str(error)


def test_grey_jpegs_become_three_equal_channels() -> None:
    data = encode_image(Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (100, 1))), "JPEG")
    (picture,) = decode_pictures([on_the_device(data)], INPUT_SIZE, CPU).numpy()
    assert np.array_equal(picture[0], picture[1]) and np.array_equal(picture[1], picture[2])
    assert mean_difference(picture, model_picture(data, "image1", None, INPUT_SIZE).transpose(2, 0, 1)) < 1.0


def test_a_front_leaves_jpegs_to_the_gpu_and_charges_the_budget_only_for_what_it_decodes(
        model_store: Path, test_settings: Callable[..., Settings]) -> None:
    """With DECODE_DEVICE=cuda a JPEG upload stays a file and none of its pixels are decoded here: a budget that
    holds only the PNG's pixels admits the pair, which it refuses (422) when both are decoded here."""
    view = load_model(model_store / TEST_MODEL_NAME, "cpu").view()
    jpeg, png = encode_image(drawn_image(1, (200, 150)), "JPEG"), encode_image(drawn_image(2, (120, 100)), "PNG")
    uploads = [Upload("image1", "a.jpg", jpeg), Upload("image2", "b.png", png)]

    async def decode(decode_device: str) -> list[JobPicture]:
        images = ImageWork(1, PixelBudget(120 * 100))
        try:
            pictures, charged = await admit_and_decode(uploads, view, images, test_settings(decode_device=decode_device))
            assert charged == 0 and images.budget.in_use == 0
            return pictures
        finally:
            images.close()

    first, second = asyncio.run(decode("cuda"))
    assert isinstance(first, EncodedJpeg) and first.name == "image1" and first.data.tobytes() == jpeg
    assert isinstance(second, np.ndarray) and np.array_equal(second, view.picture(png, "image2", None))
    with pytest.raises(Problem) as refused:
        asyncio.run(decode("cpu"))
    assert refused.value.status_code == 422


# On a GPU (bench/gpu_run.sh's tests step): nvJPEG's pictures, and the whole path through a container's processes.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: DECODE_DEVICE=cuda")


@needs_cuda
def test_the_gpu_makes_the_pictures_the_cpu_emulation_makes() -> None:
    for data in (phone_photo(6, PHOTO_SIZE, orientation=6), fine_stripes()):
        (on_gpu,) = decode_pictures([on_the_device(data)], INPUT_SIZE, torch.device("cuda")).cpu().numpy()
        (on_cpu,) = decode_pictures([on_the_device(data)], INPUT_SIZE, CPU).numpy()
        assert mean_difference(on_gpu, on_cpu) < 1.0


@needs_cuda
def test_a_container_decoding_on_its_gpu_scores_jpeg_pairs_as_one_decoding_on_the_cpu(
        model_store: Path, tmp_path: Path) -> None:
    """Front processes send the files, the owner decodes them on its GPU; a PNG beside a JPEG is decoded in front."""
    jpeg = encode_image(class_image("red", 1, (400, 300)), "JPEG", quality=90)
    png = encode_image(class_image("red", 2, (300, 400)), "PNG")
    scores = {}
    for decode_device in ("cpu", "cuda"):
        env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": "2",
               "DEVICE": "cuda", "DECODE_DEVICE": decode_device}
        with running_service(env, tmp_path / f"{decode_device}.log") as replica, \
                httpx.Client(base_url=replica.url, timeout=60, trust_env=False) as http:
            answers = [http.post("/similarity", files=pair_files(jpeg, second)) for second in (jpeg, png)]
            assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
            scores[decode_device] = [answer.json()["score"] for answer in answers]
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=0.02)


def test_jpegs_reach_the_model_owner_through_a_front_connection_and_a_broken_one_fails_alone(
        test_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A front's connection to the model's process, both sides real, in one process: a pair whose second image is a
    JPEG file scores as the pair of pictures decoded beforehand, and a file the decoder refuses comes back as
    CorruptImage naming its upload (a 422), while its batch mate still gets its score. (The owner decodes on the
    CPU here, where DECODE_DEVICE=cuda would decode on its GPU.)"""
    settings = test_settings()
    jpeg = on_the_device(encode_image(class_image("red", 4, (200, 160)), "JPEG", quality=90), "image2")
    broken = EncodedJpeg("image2", np.frombuffer(b"\xff\xd8\xff\xe0 not a JPEG at all \xff\xd9", np.uint8), 1)

    async def through_a_front() -> None:
        ready: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        server = await OwnerServer(ready, None, lambda _: None).start(tmp_path / "owner.sock")
        try:
            async with running_model_owner(settings) as owner:
                ready.set_result(owner)
                picture = decode_pictures([jpeg], owner.model.input_size, CPU)[0].numpy()
                first = owner.view.picture(encode_image(class_image("red", 3, (200, 160)), "PNG"), "image1", None)
                expected = score_pairs(owner.model, [first], [picture])
                async with connected_owner(tmp_path / "owner.sock", lambda _: 8) as front:
                    good, bad = front.submit_all(SIMILARITY_QUEUE, [(first, jpeg), (first, broken)])
                    await asyncio.wait([good.future, bad.future])
                assert good.future.result().value == pytest.approx(expected[0], abs=1e-6)
                with pytest.raises(CorruptImage, match="image2 could not be decoded") as refused:
                    bad.future.result()
                assert refused.value.name == "image2"
        finally:
            server.close()

    asyncio.run(through_a_front())
