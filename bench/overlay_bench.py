"""Overlay and decoding micro-benchmark, measured in one run (issue 10, "Real photos").

Run from the repository root: `.venv/bin/python -m bench.overlay_bench`. It prints
- the time of one overlay at 1024 px (a 1024 x 768 original) per format: the way before issue 10 (matplotlib
  colormap and Pillow blend and encode, the original resized for every overlay; kept below for comparison and
  skipped when matplotlib is not installed) against app/overlays.py now (OpenCV, WebP encoded by Pillow; the
  background is decoded and resized once per image, so it is not part of an overlay's time), with each encoded
  size, and the size of a JPEG overlay per quality for each photo of ../shared/datasets/fullsize;
- the decode of a 12 Mpx JPEG (4032 x 3024) for the model (full decode + resize against `decode_for_model`,
  the JPEG draft path) and for an overlay background at 1024 px (full decode + resize against
  `overlay_background`), and the ways to make the draft decode's picture overlay-sized.
The photo is a picture from ../shared/datasets/fullsize when present (else a drawn one), upscaled with
sensor-like noise (tests/support/images.py `phone_photo`). Times are medians of repeated runs in this process.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from app.overlays import DEFAULT_FORMAT, DEFAULT_QUALITY, OverlayFormat, overlay_background, render_overlay
from contract.images import decode_upright_rgb
from contract.preprocess import decode_for_model, resize_to
from deploy.nginx_config import REPO_ROOT
from tests.support.images import encode, phone_photo

FULLSIZE_DIR = REPO_ROOT.parent / "shared" / "datasets" / "fullsize"
ORIGINAL_SIZE = (1024, 768)
PHONE_SIZE = (4032, 3024)
MAX_SIDE = 1024
MODEL_INPUT = (224, 224)  # (height, width): the usual ImageNet-sized input; the default model's is 128 x 128
FORMATS: tuple[OverlayFormat, ...] = ("jpeg", "webp", "png")
COLORMAP = "jet"
OPACITY = 0.5
REPEATS = 15
SIZE_QUALITIES = (60, 70, 80, 90)
TARGET_OVERLAY_MS = 15.0


def median_ms(work: Callable[[], object], repeats: int = REPEATS) -> float:
    work()  # first call: imports, allocator and codec set-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def source_picture() -> tuple[Image.Image | None, str]:
    """The largest photo of ../shared/datasets/fullsize, or None (phone_photo then draws one)."""
    photos = sorted(FULLSIZE_DIR.glob("*.jpg")) if FULLSIZE_DIR.is_dir() else []
    if not photos:
        return None, "a drawn picture (../shared/datasets/fullsize is absent)"
    largest = max(photos, key=lambda path: np.prod(Image.open(path).size))
    return Image.open(largest), f"{largest.name} from ../shared/datasets/fullsize"


def grad_cam_like_heatmap(seed: int = 0) -> np.ndarray:
    """A smooth map in [0, 1] at a model's input size, like an upsampled 7 x 7 Grad-CAM map."""
    coarse = np.random.default_rng(seed).random((7, 7)).astype(np.float32)
    heatmap = cv2.resize(coarse, MODEL_INPUT[::-1], interpolation=cv2.INTER_LINEAR)
    return heatmap / heatmap.max()


def old_overlay(original: Image.Image, heatmap: np.ndarray, fmt: str) -> bytes:
    """app/overlays.py before issue 10, verbatim in substance: matplotlib colours, float blend, Pillow encode."""
    import matplotlib

    scale = min(1.0, MAX_SIDE / max(original.size))
    size = max(1, round(original.width * scale)), max(1, round(original.height * scale))
    background = np.asarray(original.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    stretched = Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps[COLORMAP](np.clip(np.asarray(stretched), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - OPACITY) * background + OPACITY * colours
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(
        buffer, format=fmt.upper(), **({"quality": 90} if fmt != "png" else {}))
    return buffer.getvalue()


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def print_jpeg_sizes(heatmap: np.ndarray) -> None:
    """JPEG overlay sizes at 1024 px for each photo of ../shared/datasets/fullsize made phone-sized: what the
    default quality means for /explain's response (four overlays, base64: 4/3 of their size)."""
    photos = sorted(FULLSIZE_DIR.glob("*.jpg")) if FULLSIZE_DIR.is_dir() else []
    if not photos:
        return
    print(f"\nJPEG overlay at {MAX_SIDE} px, kB, per photo made {PHONE_SIZE[0]} x {PHONE_SIZE[1]}; quality:"
          + "".join(f"{quality:>6}" for quality in SIZE_QUALITIES))
    for path in photos:
        background = overlay_background(phone_photo(2, PHONE_SIZE, picture=Image.open(path)), "image1", None,
                                        MAX_SIDE).pixels
        sizes = [len(render_overlay(background, heatmap, COLORMAP, OPACITY, "jpeg", quality)) / 1000
                 for quality in SIZE_QUALITIES]
        print(f" {path.name[:60]:60}" + "".join(f"{size:6.0f}" for size in sizes))


def print_background_resizes(phone: bytes) -> None:
    """The last step of `overlay_background` on the phone photo, which its draft decode leaves at 1/2 scale: each
    way of resizing that to overlay size, its time, and its mean difference (grey levels) from the area average of
    the full-size decode (what the picture is, at that size)."""
    draft = Image.open(io.BytesIO(phone))
    draft.draft("RGB", (MAX_SIDE, MAX_SIDE * 3 // 4))
    picture = draft.convert("RGB")
    decoded = np.asarray(picture)
    size = (MAX_SIDE, MAX_SIDE * 3 // 4)
    truth = cv2.resize(np.asarray(decode_upright_rgb(phone)), size, interpolation=cv2.INTER_AREA).astype(float)
    ways: dict[str, Callable[[], np.ndarray]] = {
        # as overlay_background did before: Pillow's resize of the decoded picture, then an array
        "Pillow bilinear (antialiased)": lambda: np.asarray(picture.resize(size, Image.Resampling.BILINEAR)),
        "OpenCV area": lambda: cv2.resize(decoded, size, interpolation=cv2.INTER_AREA),
        "OpenCV bilinear (overlay_background)": lambda: cv2.resize(decoded, size, interpolation=cv2.INTER_LINEAR),
    }
    print(f" its draft decode ({decoded.shape[1]} x {decoded.shape[0]}) resized to {size[0]} x {size[1]}: ms, "
          "mean difference from the full decode's area average")
    for name, way in ways.items():
        print(f"  {name:38} {median_ms(way):6.1f} ms {np.abs(way() - truth).mean():6.2f}")


def main() -> None:
    picture, origin = source_picture()
    seed = 1
    phone = phone_photo(seed, PHONE_SIZE, picture=picture)
    # The 1024 x 768 original is the phone photo made smaller, as a client would send it.
    original_jpeg = encode(decode_upright_rgb(phone).resize(ORIGINAL_SIZE, Image.Resampling.LANCZOS), "JPEG",
                           quality=92)
    original = decode_upright_rgb(original_jpeg)
    heatmap = grad_cam_like_heatmap()
    print(f"photo: {origin}; OpenCV {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads; medians of "
          f"{REPEATS} runs\n")

    background = overlay_background(original_jpeg, "image1", None, MAX_SIDE).pixels
    print(f"one overlay at {MAX_SIDE} px ({ORIGINAL_SIZE[0]} x {ORIGINAL_SIZE[1]} original), colormap {COLORMAP}, "
          f"opacity {OPACITY}")
    print(" format  | before (matplotlib + Pillow, quality 90) | now (app/overlays.py, quality "
          f"{DEFAULT_QUALITY})")
    new_ms = {}
    for fmt in FORMATS:
        if has_matplotlib():
            before_ms = median_ms(lambda fmt=fmt: old_overlay(original, heatmap, fmt), repeats=5)
            before = f"{before_ms:8.1f} ms {len(old_overlay(original, heatmap, fmt)) / 1000:7.1f} kB"
        else:
            before = "(matplotlib not installed)"
        new_ms[fmt] = median_ms(
            lambda fmt=fmt: render_overlay(background, heatmap, COLORMAP, OPACITY, fmt, DEFAULT_QUALITY))
        size_kb = len(render_overlay(background, heatmap, COLORMAP, OPACITY, fmt, DEFAULT_QUALITY)) / 1000
        print(f" {fmt:7} | {before:>40} | {new_ms[fmt]:8.1f} ms {size_kb:7.1f} kB")
    print_jpeg_sizes(heatmap)

    print(f"\n{PHONE_SIZE[0]} x {PHONE_SIZE[1]} JPEG ({len(phone) / 1e6:.1f} MB)")
    full_model = median_ms(lambda: resize_to(decode_upright_rgb(phone), MODEL_INPUT), repeats=5)
    draft_model = median_ms(lambda: decode_for_model(phone, "image1", None, MODEL_INPUT), repeats=5)
    print(f" for the model ({MODEL_INPUT[1]} x {MODEL_INPUT[0]}): full decode + resize {full_model:.1f} ms, "
          f"decode_for_model (draft) {draft_model:.1f} ms")
    # the other libjpeg-turbo front end at hand, for the same 1/8 scale: the Huffman decoding of the whole file,
    # which no scale skips, is most of either
    encoded = np.frombuffer(phone, dtype=np.uint8)
    opencv_eighth = median_ms(lambda: cv2.imdecode(encoded, cv2.IMREAD_REDUCED_COLOR_8), repeats=5)
    print(f" OpenCV's imdecode at 1/8 scale (IMREAD_REDUCED_COLOR_8), for comparison: {opencv_eighth:.1f} ms")

    def full_background() -> np.ndarray:
        upright = decode_upright_rgb(phone).resize((MAX_SIDE, MAX_SIDE * 3 // 4), Image.Resampling.BILINEAR)
        return cv2.cvtColor(np.asarray(upright), cv2.COLOR_RGB2BGR)

    full_overlay = median_ms(full_background, repeats=5)
    draft_overlay = median_ms(lambda: overlay_background(phone, "image1", None, MAX_SIDE), repeats=5)
    print(f" as an overlay background ({MAX_SIDE} px): full decode + resize {full_overlay:.1f} ms, "
          f"overlay_background (draft) {draft_overlay:.1f} ms")

    print_background_resizes(phone)

    met = "met" if new_ms[DEFAULT_FORMAT] <= TARGET_OVERLAY_MS else "NOT met"
    print(f"\ntarget: one overlay at {MAX_SIDE} px <= {TARGET_OVERLAY_MS:g} ms (default format {DEFAULT_FORMAT}): "
          f"{new_ms[DEFAULT_FORMAT]:.1f} ms, {met}")


if __name__ == "__main__":
    main()
