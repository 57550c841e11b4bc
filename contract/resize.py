"""The resize that makes the model's picture, in numpy: bit for bit torchvision's antialiased bilinear resize of a
uint8 image (`F.resize(tensor, size, antialias=True)`, which torch runs in fixed point), without importing torch.

The service's HTTP front processes make pictures without torch (importing torch and torchvision alone costs about
630 MB of memory), and training and the service must keep making the same pictures as the model was trained on:
this is the one resize both use (through `contract.picture`).

What torch computes (aten/src/ATen/native/cpu/UpSampleKernel.cpp: `_compute_indices_min_size_weights_aa`,
`_compute_index_ranges_int16_weights`, `basic_loop_aa_horizontal<uint8_t>`; its AVX2 and NEON kernels use the same
integer weights and sums: its AVX2, AVX-512 and generic builds give the same pixels, checked against this module),
per axis of `n_in` samples resized to `n_out`:

- scale = n_in / n_out; support = scale when shrinking, else 1; center = scale (i + 0.5); output i covers the
  input samples from xmin = max(trunc(center - support + 0.5), 0) to min(trunc(center + support + 0.5), n_in),
  at most 2 ceil(support) + 1 of them;
- their weights are the triangle max(0, 1 - |x - center + 0.5| / max(scale, 1)) at each sample x, normalised to sum
  1 in double precision, then made integers: w * 2^p rounded half up, p the most bits (at most 22) for which
  twice the largest weight of the axis, times 2^p, still rounds below 2^15 (int16);
- output = clamp((2^(p-1) + sum of w_int * sample) >> p, 0, 255) (the clamp never acts on these weights): first
  along the width, rounded to uint8, then along the height.

Here each axis is a band matrix of w_int / 2^p, applied with BLAS in blocks of output samples (a block multiplies
only the input samples its outputs reach). Every product and partial sum is a multiple of 2^-p below 256, so the
products are exact: in float64 always (2^53), in float32 while 255 * max(sum of w_int) + 2^(p-1) < 2^24, which holds
for reductions up to about 4 times, the range decoding leaves to this resize (see `contract.images`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

MAX_CHANNELS = 4  # cv2.transpose moves pixels of up to 32 bytes: 4 channels of float64
_FLOAT32_INTEGERS = 1 << 24  # float32 holds every integer up to 2^24
# What a block costs, measured on this project's 2-core Xeon (AVX-512) with numpy's OpenBLAS on one thread: a
# BLAS call with its slicing, and a float32 multiply-add (float64's take twice as long); they size the blocks,
# balancing calls against the zeros a block multiplies.
_CALL_SECONDS = 2.5e-6
_MULTIPLY_SECONDS = 2.4e-11
# Samples (pixels x channels) per chunk of rows in the width pass: their float copy (512 kB in float32) stays in
# the CPU's cache, which made the resize of 504 x 378 and 895 x 671 pixels to 224 x 224 2 to 3 times faster than
# one chunk of 1 M samples (and 1.1 to 2x faster than chunks of 16 k).
_CHUNK_SAMPLES = 1 << 17


@dataclass(frozen=True)
class _AxisWeights:
    """torch's integer weights for one axis: output i is sum(weights[i, k] * input[first[i] + k]) / 2^precision."""

    first: np.ndarray  # [n_out] int64, the first input sample
    count: np.ndarray  # [n_out] int64, how many input samples (weights beyond are 0)
    weights: np.ndarray  # [n_out, taps] int64
    precision: int

    @property
    def largest_sum(self) -> int:
        """255 x the largest sum of one output's weights, plus the rounding half: the largest integer sum."""
        return 255 * int(self.weights.sum(axis=1).max()) + (1 << (self.precision - 1))


@dataclass(frozen=True)
class _Block:
    outputs: slice
    inputs: slice
    weights: np.ndarray  # [outputs, inputs], w_int / 2^precision, in the pass's float type


@dataclass(frozen=True)
class _AxisPass:
    """One axis's resize as band blocks, in the float type that computes it exactly."""

    dtype: type[np.floating]
    blocks: tuple[_Block, ...]

    def apply(self, samples: np.ndarray, final: bool) -> np.ndarray:
        """`samples` [n_in, columns] (each column resized alone) to the rounded [n_out, columns], as floats holding
        integers 0..255; with `final`, not yet floored (the cast to uint8 truncates)."""
        samples = samples.astype(self.dtype, copy=False)
        sums = np.empty((self.blocks[-1].outputs.stop, samples.shape[1]), self.dtype)
        for block in self.blocks:
            np.matmul(block.weights, samples[block.inputs], out=sums[block.outputs])
        np.add(sums, 0.5, out=sums)
        if not final:
            np.floor(sums, out=sums)
        return sums


def antialiased_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 pixels [H, W, C] (C from 1 to 4, e.g. `np.asarray` of an RGB Pillow image) resized to `size`
    ([height, width]) exactly as torchvision's `F.resize(pixels as [C, H, W], size, antialias=True)` (bilinear):
    a new C-contiguous uint8 array [height, width, C]."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or not 1 <= pixels.shape[2] <= MAX_CHANNELS:
        raise ValueError(f"expected uint8 pixels [height, width, 1 to {MAX_CHANNELS} channels], got {pixels.dtype} "
                         f"{list(pixels.shape)}")
    height, width = size
    if height < 1 or width < 1 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"cannot resize {list(pixels.shape[:2])} pixels to {list(size)}: every side must be >= 1")
    in_height, in_width, channels = pixels.shape
    if (height, width) == (in_height, in_width):
        return pixels.copy()
    if width == in_width:
        rows = pixels.reshape(in_height, in_width * channels)
    else:
        rows = _width_pass(pixels, width, final=height == in_height)
        if height == in_height:
            return rows.astype(np.uint8).reshape(height, width, channels)
    resized = _axis_pass(in_height, height, rows.shape[1]).apply(rows, final=True)
    return resized.astype(np.uint8).reshape(height, width, channels)


def _width_pass(pixels: np.ndarray, width: int, final: bool) -> np.ndarray:
    """The width pass, a few rows at a time (so that their float copies stay in the CPU's cache): each chunk
    transposed (the band blocks combine rows), resized, and transposed back into the result, [H, width * C]."""
    in_height, in_width, channels = pixels.shape
    chunk = max(1, min(in_height, _CHUNK_SAMPLES // (in_width * channels)))
    axis = _axis_pass(in_width, width, chunk * channels)
    rows = np.empty((in_height, width, channels), axis.dtype)
    for start in range(0, in_height, chunk):
        stop = min(start + chunk, in_height)
        columns = _transposed(pixels[start:stop]).reshape(in_width, (stop - start) * channels)
        cv2.transpose(axis.apply(columns, final).reshape(width, stop - start, channels), dst=rows[start:stop])
    return rows.reshape(in_height, width * channels)


def _transposed(pixels: np.ndarray) -> np.ndarray:
    """[a, b, C] to [b, a, C], contiguous (OpenCV's transpose: several times numpy's copy of a transposed view)."""
    swapped = cv2.transpose(pixels)
    return swapped.reshape(pixels.shape[1], pixels.shape[0], pixels.shape[2])


@lru_cache(maxsize=256)
def _axis_pass(n_in: int, n_out: int, columns: int) -> _AxisPass:
    """The blocks for resizing `n_in` samples to `n_out`, over `columns` columns at a time (what sizes them)."""
    axis = _axis_weights(n_in, n_out)
    # torch clamps to 255, which these weights never need: the rounded weights sum to at most taps / 2 above 2^p,
    # and rounding a 255 up to 256 takes 2^p / 510 above it, more than the taps (2 x scale + 1) for any reduction
    # below about 8,000 times
    assert axis.largest_sum >> axis.precision <= 255, (n_in, n_out)
    exact_in_float32 = axis.largest_sum < _FLOAT32_INTEGERS
    dtype = np.float32 if exact_in_float32 else np.float64
    block = _block_size(axis, columns, 1.0 if exact_in_float32 else 2.0)
    n_blocks = -(-n_out // block)
    # first and stops never decrease with the output index: a block reads from its first output's first input
    # sample to its last output's last
    starts = np.arange(n_blocks) * block
    lasts = np.minimum(starts + block, n_out) - 1
    inputs_from, inputs_to = axis.first[starts], (axis.first + axis.count)[lasts]
    # every block's weights in one zero-padded array, filled at once; a block is a view of its part
    weights = np.zeros((n_blocks, block, int((inputs_to - inputs_from).max())), dtype)
    outputs, taps = np.nonzero(np.arange(axis.weights.shape[1]) < axis.count[:, None])
    weights[outputs // block, outputs % block, axis.first[outputs] + taps - inputs_from[outputs // block]] = (
        axis.weights[outputs, taps] / float(1 << axis.precision))
    blocks = tuple(_Block(slice(int(start), int(last) + 1), slice(int(low), int(high)),
                          weights[index, :last - start + 1, :high - low])
                   for index, (start, last, low, high) in enumerate(zip(starts, lasts, inputs_from, inputs_to)))
    return _AxisPass(dtype, blocks)


def _block_size(axis: _AxisWeights, columns: int, multiply_factor: float) -> int:
    """The outputs per block that make the fewest seconds: BLAS calls against the zeros inside the blocks."""
    stops = axis.first + axis.count
    n_out = len(axis.first)

    def seconds(block: int) -> float:
        starts = np.arange(0, n_out, block)
        lasts = np.minimum(starts + block, n_out) - 1
        multiplies = float(((lasts - starts + 1) * (stops[lasts] - axis.first[starts])).sum()) * columns
        return len(starts) * _CALL_SECONDS + multiplies * _MULTIPLY_SECONDS * multiply_factor

    return min((1 << k for k in range(max(1, n_out.bit_length()))), key=seconds)


@lru_cache(maxsize=256)
def _axis_weights(n_in: int, n_out: int) -> _AxisWeights:
    """torch's weights, in the same double-precision operations in the same order (so the same roundings)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out, dtype=np.float64) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    # torch clips the count to the taps: rounding can make it one more
    count = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - first, 0, taps)
    weights = np.zeros((n_out, taps))
    total = np.zeros(n_out)
    for tap in range(taps):  # summed tap after tap, as torch sums them
        distance = np.abs(((first + tap).astype(np.float64) - center + 0.5) * inverse_scale)
        weight = np.where((distance < 1.0) & (tap < count), 1.0 - distance, 0.0)
        weights[:, tap] = weight
        total += weight
    normalised = total != 0.0
    weights[normalised] /= total[normalised, None]
    largest = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    integers = np.trunc(0.5 + weights * (1 << precision)).astype(np.int64)
    return _AxisWeights(first, count, integers, precision)
