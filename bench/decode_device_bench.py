"""DECODE_DEVICE=cuda against the CPU's decoding (issue 22): how fast the model's device makes pictures of JPEG
uploads, and how far its pictures and scores are from the CPU path's.

Run from the repository root: `.venv/bin/python -m bench.decode_device_bench [--device cpu|cuda] [--batch N]
[--model DIR] [--data DIR]`. On a CPU the device path runs torchvision's CPU decoder (app/device_decode.py's code
but the decoder): that measures the emulation of draft mode and the scores it gives, not a GPU's speed.

1. Photos: 12 Mpx JPEGs (../shared/datasets/fullsize upscaled with sensor-like noise, as bench.photos_bench makes
   them; drawn ones without that folder). The CPU path (`contract.picture.model_picture`: Pillow's draft decoding
   and the resize, one image at a time, as one image thread does) and the device path
   (`app.device_decode.decode_pictures`, --batch files at once, the device synchronised before the clock stops),
   each in ms per image, the best of ROUNDS; the CPU cores the CPU path would need for TARGET_PAIRS_S pairs/s of such
   photos; and the mean and largest difference between the two paths' pictures, in grey levels.
2. Scores: the model's test split (`training.evaluate.evaluation_set`), every pair scored by the service's batch
   runner (`app.model.score_pairs`) from the CPU's pictures and from the files decoded on the device: the largest
   and mean score difference, and the decisions that flip.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.device_decode import decode_pictures
from app.jobs import EncodedJpeg, JobPicture
from app.model import load_model, score_pairs, warm_up
from bench.overlay_bench import FULLSIZE_DIR
from bench.precision_bench import DEFAULT_DATA, load_average
from bench.service_bench import DEFAULT_MODEL_DIR
from contract.images import device_jpeg_header
from contract.manifest import read_manifest
from contract.picture import model_picture
from tests.support.images import phone_photo
from training.data import decode_images
from training.evaluate import evaluation_set

PHONE_SIZE = (4032, 3024)
DRAWN_PHOTOS = 8
ROUNDS = 3
TARGET_PAIRS_S = 1_000  # issue 22's GPU target for /similarity
DEFAULT_BATCH = {"cpu": 8, "cuda": 32}


def as_upload(data: bytes, name: str) -> JobPicture | None:
    """What a front with DECODE_DEVICE=cuda sends for `data`, or None for a file it decodes itself."""
    _, orientation = device_jpeg_header(data, name, None)
    return None if orientation is None else EncodedJpeg(name, np.frombuffer(bytearray(data), np.uint8), orientation)


def photos() -> tuple[list[bytes], str]:
    sources = sorted(FULLSIZE_DIR.glob("*.jpg")) if FULLSIZE_DIR.is_dir() else []
    if sources:
        files = [phone_photo(seed, PHONE_SIZE, picture=Image.open(path)) for seed, path in enumerate(sources)]
        return files, f"{len(files)} photos of {FULLSIZE_DIR.name} upscaled to {PHONE_SIZE[0]} x {PHONE_SIZE[1]}"
    files = [phone_photo(seed, PHONE_SIZE) for seed in range(DRAWN_PHOTOS)]
    return files, f"{len(files)} drawn {PHONE_SIZE[0]} x {PHONE_SIZE[1]} photos ({FULLSIZE_DIR} is absent)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photos_section(device: torch.device, batch: int, input_size: tuple[int, int]) -> None:
    files, described = photos()
    print(f"\n== 1. {described}, {sum(map(len, files)) / len(files) / 1e6:.1f} MB a file on average ==")
    jpegs = [as_upload(data, f"photo {index}") for index, data in enumerate(files)]
    assert all(isinstance(jpeg, EncodedJpeg) for jpeg in jpegs), "every photo is a JPEG the device takes"
    cpu_ms = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        cpu_pictures = [model_picture(data, "photo", None, input_size).transpose(2, 0, 1) for data in files]
        cpu_ms.append((time.perf_counter() - started) * 1000 / len(files))
    decode_pictures(jpegs[:1], input_size, device)  # the decoder's first call sets it up
    device_ms = []
    for _ in range(ROUNDS):
        decoded = []
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(jpegs), batch):
            decoded.append(decode_pictures(jpegs[start:start + batch], input_size, device))
        synchronize(device)
        device_ms.append((time.perf_counter() - started) * 1000 / len(jpegs))
    device_pictures = torch.cat(decoded).cpu().numpy()
    differences = [np.abs(ours.astype(np.int16) - theirs) for ours, theirs in zip(device_pictures, cpu_pictures)]
    print(f"CPU path (Pillow's draft decoding and the resize, one thread): {min(cpu_ms):7.1f} ms an image; "
          f"{2 * TARGET_PAIRS_S * min(cpu_ms) / 1000:.0f} cores for {TARGET_PAIRS_S:,} pairs/s of these")
    print(f"device path ({device}, batches of {batch}):                {min(device_ms):7.1f} ms an image; "
          f"{min(cpu_ms) / min(device_ms):.1f}x the CPU path's images/s on one core")
    print(f"pictures: mean difference {np.mean([d.mean() for d in differences]):.2f} grey levels (largest of an "
          f"image {max(d.mean() for d in differences):.2f}), largest single difference "
          f"{max(int(d.max()) for d in differences)}")


def scores_section(device: torch.device, batch: int, model_dir: Path, data_dir: Path) -> None:
    manifest = read_manifest(model_dir)
    chosen = evaluation_set(manifest, data_dir, "test", manifest.training["seed"])
    first, second, _ = chosen.pairs
    print(f"\n== 2. scores: model {manifest.name}'s test split, {len(chosen.paths)} images, {len(first)} pairs ==")
    model = load_model(model_dir, str(device))
    warm_up(model)
    cpu_pictures = list(decode_images(chosen.paths, manifest.input_size))
    uploads = [as_upload(path.read_bytes(), path.name) for path in chosen.paths]
    device_pictures = [upload if upload is not None else picture for upload, picture in zip(uploads, cpu_pictures)]
    on_device = sum(upload is not None for upload in uploads)
    scores: dict[str, list[float]] = {"cpu": [], "device": []}
    for start in range(0, len(first), batch):
        pairs = list(zip(first[start:start + batch], second[start:start + batch]))
        for name, pictures in (("cpu", cpu_pictures), ("device", device_pictures)):
            scores[name] += score_pairs(model, [pictures[i] for i, _ in pairs], [pictures[j] for _, j in pairs])
    reference, moved = np.array(scores["cpu"]), np.array(scores["device"])
    differences = np.abs(moved - reference)
    flipped = int(((reference >= manifest.threshold) != (moved >= manifest.threshold)).sum())
    print(f"{on_device} of {len(uploads)} files decoded on the device ({device}); score difference from the CPU "
          f"path's: largest {differences.max():.2e}, mean {differences.mean():.2e}; decisions flipped: {flipped} "
          f"of {len(reference)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, help="files per decode and pairs per batch (default: 8 on a CPU, "
                        "32 on a GPU)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dataset the model was trained on")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or DEFAULT_BATCH[device.type]
    manifest = read_manifest(args.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{load_average()}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; device {name}; "
          f"model input {manifest.input_size[0]} x {manifest.input_size[1]}", flush=True)
    photos_section(device, batch, tuple(manifest.input_size))
    if args.data.is_dir():
        scores_section(device, batch, args.model, args.data)
    else:
        print(f"\n== 2. scores: skipped, {args.data} is absent ==")
    print(f"\n{load_average()} at the end")


if __name__ == "__main__":
    main()
