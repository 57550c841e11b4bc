"""DECODE_DEVICE=cuda: JPEG uploads decoded on the model's GPU, a batch at a time (torchvision's `decode_jpeg`,
nvJPEG), into the same uint8 pictures that `contract.picture` makes on the CPU, to within a few grey levels.

The CPU path (contract/images.py) decodes a JPEG scaled down by 1/2, 1/4 or 1/8 in the DCT domain (Pillow's draft
mode), box-averages it further by whole factors while it stays twice the input size, turns it upright, and resizes
it antialiased. A GPU decoder has no scaled decoding, so here the full-size picture is box-averaged by the same
factors, then turned and resized the same way: on photos that came within 0.2-0.5 grey levels of the CPU's pictures
on average (a direct resize from full size: 0.8-2.8), and smaller pictures, which draft mode does not scale, come
out identical (bench/RESULTS.md, "JPEG decoding on the model's device").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as tvf

from app.jobs import EncodedJpeg
from contract.images import REDUCING_GAP, SWAPS_SIDES, CorruptImage

# torchvision 0.29 deprecates its image decoders for TorchCodec's (0.16 on), warning at every call; the pinned
# torchvision's still work, and the service's log is no place for the notice.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

# Pillow's draft mode: the DCT scalings libjpeg offers.
_DRAFT_SCALES = (8, 4, 2, 1)


def decode_pictures(jpegs: Sequence[EncodedJpeg], input_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The JPEGs as upright uint8 pictures [N, 3, H, W] at `input_size` ([height, width]) on `device`; CorruptImage
    (naming the first upload that fails) when a file cannot be decoded."""
    # Files arrive in writable arrays from a front process; in one process they are read-only views of the upload,
    # which torch would warn about (its decoders only read them).
    files = [torch.from_numpy(np.require(jpeg.data, requirements="W")) for jpeg in jpegs]
    if device.type == "cuda":
        # torchvision's nvJPEG path writes its output from a stream of its own, not ordered after the work still
        # queued on ours, which may be using the memory it is given (pytorch/vision#9606, seen on H100s): let
        # that work finish first.
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decoded_alone(file, jpeg, device) for file, jpeg in zip(files, jpegs, strict=True)]
    return torch.stack([_model_picture(picture, jpeg.orientation, input_size)
                        for picture, jpeg in zip(decoded, jpegs, strict=True)])


def blank_jpeg(input_size: tuple[int, int]) -> EncodedJpeg:
    """A black JPEG the size of the model's input, for the warm-up."""
    return EncodedJpeg("warm-up", encode_jpeg(torch.zeros(3, *input_size, dtype=torch.uint8)).numpy(), orientation=1)


def _decoded_alone(file: torch.Tensor, jpeg: EncodedJpeg, device: torch.device) -> torch.Tensor:
    """One file of a batch that failed: decoded by itself, so that the error names the upload at fault."""
    try:
        return decode_jpeg(file, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        raise CorruptImage(jpeg.name, f"{jpeg.name} could not be decoded ({error}); the file is truncated or "
                                      "damaged, send it again.") from error


def _model_picture(stored: torch.Tensor, orientation: int, input_size: tuple[int, int]) -> torch.Tensor:
    """A decoded JPEG [3, h, w], as stored, to the upright model picture [3, H, W]: contract/images.py's
    shrinking emulated with box averages, then its transposition, then contract/resize.py's resize."""
    height, width = input_size
    swapped = orientation in SWAPS_SIDES  # stored with width and height exchanged
    needed_height, needed_width = (width, height) if swapped else (height, width)
    stored_height, stored_width = stored.shape[-2:]
    ratio = min(stored_width // needed_width, stored_height // needed_height)
    draft = next((scale for scale in _DRAFT_SCALES if ratio >= scale), 1)  # 1: smaller than the input
    shrunk = stored[None].float()
    if draft > 1:
        shrunk = nnf.avg_pool2d(shrunk, draft, ceil_mode=True)
    factors = (max(1, shrunk.shape[-2] // (REDUCING_GAP * needed_height)),
               max(1, shrunk.shape[-1] // (REDUCING_GAP * needed_width)))
    if factors != (1, 1):
        shrunk = nnf.avg_pool2d(shrunk, factors, ceil_mode=True)
    picture = _upright(shrunk[0].round_().clamp_(0, 255).to(torch.uint8), orientation)
    return tvf.resize(picture, [height, width], antialias=True)


def _upright(picture: torch.Tensor, orientation: int) -> torch.Tensor:
    """What contract/images.py's _UPRIGHT_TRANSPOSITIONS do, on a [3, h, w] tensor."""
    match orientation:
        case 2:
            return picture.flip(-1)
        case 3:
            return picture.flip(-2, -1)
        case 4:
            return picture.flip(-2)
        case 5:
            return picture.transpose(-2, -1)
        case 6:
            return picture.rot90(-1, (-2, -1))
        case 7:
            return picture.transpose(-2, -1).flip(-2, -1)
        case 8:
            return picture.rot90(1, (-2, -1))
    return picture
