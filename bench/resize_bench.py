"""The model picture's resize without torch (contract/resize.py) against torchvision's, measured in one run.

Run from the repository root: `.venv/bin/python -m bench.resize_bench` (about a minute here). It prints
- per size, the least time of one resize of a uint8 RGB picture, best of ROUNDS rounds: torchvision's (`F.resize`
  of the [3, H, W] tensor, antialiased, what contract/preprocess.py called before; torch on 1 thread) and
  `antialiased_resize`'s (numpy, its BLAS on 1 thread), with their ratio and the numpy resize's first call for that
  size (its weights computed, then cached). The sizes: what JPEG draft decoding leaves of a 4032 x 3024 phone photo
  for a 224 x 224 input (504 x 378, upright and turned); the most decoding leaves for 224 (895 x 671); a flowers
  photo (256 x 170) to 224; 1000 x 750 to 128 x 128; and a 12 Mpx picture decoded at full size, to 224 x 224;
- the bundled model's scores of PAIRS pairs of ../shared/datasets/flowers photos whose pictures were made both
  ways (decode_upright_rgb, then torchvision's resize or `contract.picture.model_picture`): how many pictures
  differ and the largest score difference, both 0 when the resize is torchvision's to the bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS: one core, like a front process

import argparse  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

import contract.resize  # noqa: E402
from app.model import load_model, score_pairs  # noqa: E402
from contract.images import decode_upright_rgb  # noqa: E402
from contract.picture import model_picture  # noqa: E402
from contract.preprocess import picture_tensor  # noqa: E402
from contract.resize import antialiased_resize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers"
MODEL = REPO / "model_store" / "flowers"
ROUNDS = 7
# (input [height, width], output [height, width], what it is)
SIZES: tuple[tuple[tuple[int, int], tuple[int, int], str], ...] = (
    ((504, 378), (224, 224), "12 Mpx portrait JPEG after draft decoding"),
    ((378, 504), (224, 224), "12 Mpx landscape JPEG after draft decoding"),
    ((895, 671), (224, 224), "the most decoding leaves for 224"),
    ((170, 256), (224, 224), "a flowers photo"),
    ((750, 1000), (128, 128), "1000 x 750 to 128"),
    ((3000, 4000), (224, 224), "12 Mpx without draft decoding"),
)


def least_ms(work: Callable[[], object], repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        best = min(best, (time.perf_counter() - started) / repeats)
    return 1000 * best


def time_sizes() -> None:
    generator = np.random.default_rng(0)
    print(f"least time of one resize, best of {ROUNDS} rounds; torch {torch.__version__} on "
          f"{torch.get_num_threads()} thread ({torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f" {'input':>11} -> {'output':<9} | torchvision |   numpy  | ratio | numpy first call | {'':<}")
    for (height, width), size, what in SIZES:
        # smooth content with noise, like a photo: the time does not depend on it
        smooth = (np.arange(height, dtype=np.int16)[:, None] * 7 + np.arange(width, dtype=np.int16) * 3) % 256
        noise = generator.integers(-20, 21, (height, width, 3), dtype=np.int16)
        pixels = np.clip(smooth[:, :, None] + noise, 0, 255).astype(np.uint8)
        tensor = picture_tensor(pixels)
        repeats = 3 if height * width > 4_000_000 else 30
        torchvision_ms = least_ms(lambda: F.resize(tensor, list(size), antialias=True), repeats)
        contract.resize._axis_weights.cache_clear()
        contract.resize._axis_pass.cache_clear()
        started = time.perf_counter()
        resized = antialiased_resize(pixels, size)
        first_ms = 1000 * (time.perf_counter() - started)
        numpy_ms = least_ms(lambda: antialiased_resize(pixels, size), repeats)
        same = np.array_equal(resized, F.resize(tensor, list(size), antialias=True).permute(1, 2, 0).numpy())
        print(f" {height:>5} x {width:<4} -> {size[0]} x {size[1]:<3} | {torchvision_ms:8.3f} ms | "
              f"{numpy_ms:6.3f} ms | {numpy_ms / torchvision_ms:5.2f} | {first_ms:10.2f} ms     | {what}"
              f"{'' if same else '  DIFFERENT PIXELS'}")


def compare_scores(pairs: int) -> None:
    if not FLOWERS.is_dir():
        print(f"\nscores: {FLOWERS} is absent, skipped")
        return
    served = load_model(MODEL, "cpu")
    height, width = served.input_size
    photos = sorted(FLOWERS.rglob("*.jpg"))
    random.Random(22).shuffle(photos)
    photos = photos[:2 * pairs]
    before, now = [], []
    for path in photos:
        decoded = decode_upright_rgb(path, path.name, None, at_least=(width, height))
        before.append(F.resize(F.pil_to_tensor(decoded), [height, width], antialias=True))
        now.append(picture_tensor(model_picture(path, path.name, None, (height, width))))
    differing = sum(not torch.equal(old, new) for old, new in zip(before, now))
    scores_before, scores_now = [], []
    for start in range(0, 2 * pairs, 64):
        scores_before += score_pairs(served, before[start:start + 64:2], before[start + 1:start + 64:2])
        scores_now += score_pairs(served, now[start:start + 64:2], now[start + 1:start + 64:2])
    largest = max(abs(old - new) for old, new in zip(scores_before, scores_now))
    print(f"\nscores of {pairs} pairs of flowers photos by {served.manifest.name} {served.manifest.version} "
          f"({served.manifest.backbone}, {height} x {width}), pictures made by torchvision's resize and by "
          f"contract.picture:\n pictures that differ: {differing} of {len(photos)}; largest score difference: "
          f"{largest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="flowers pairs scored both ways")
    arguments = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    time_sizes()
    torch.set_num_threads(threads)
    compare_scores(arguments.pairs)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
