"""Overlays: each one is the colormap's colour of the heatmap, stretched bilinearly over the upright original and
blended with it, at the original's aspect ratio; backgrounds of large photos are decoded only as large as needed."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from app.colormaps import COLORMAPS, rgb_table
from app.overlays import overlay_background, render_overlay
from tests.support import colormap_tables
from tests.support.images import drawn_image, encode, pair_files, phone_photo

APP_JS = Path(__file__).resolve().parents[2] / "app" / "static" / "app.js"
ROTATED_90 = 6  # EXIF orientation: the stored pixels are turned 90 degrees clockwise to stand upright


def bilinear(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """`values` [h, w] resized to [height, width]: pixel centres aligned, edges clamped (no antialiasing)."""
    rows, columns = values.shape

    def positions(count: int, source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centres = np.clip((np.arange(count) + 0.5) * source / count - 0.5, 0, source - 1)
        low = np.floor(centres).astype(int)
        return low, np.minimum(low + 1, source - 1), centres - low

    top, bottom, down = positions(height, rows)
    left, right, across = positions(width, columns)
    upper = values[top][:, left] * (1 - across) + values[top][:, right] * across
    lower = values[bottom][:, left] * (1 - across) + values[bottom][:, right] * across
    return upper * (1 - down)[:, None] + lower * down[:, None]


def reference_blend(upright_rgb: np.ndarray, heatmap: np.ndarray, colormap: str, opacity: float) -> np.ndarray:
    """What an overlay must show, computed independently of OpenCV: RGB float [height, width, 3]."""
    height, width = upright_rgb.shape[:2]
    entries = np.rint(np.clip(bilinear(heatmap, width, height), 0, 1) * 255).astype(int)
    return (1 - opacity) * upright_rgb.astype(np.float64) + opacity * rgb_table(colormap)[entries]


def _smooth_heatmap(seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).random((7, 7))
    heatmap = bilinear(coarse, 128, 128)
    return heatmap / heatmap.max()


def _picture(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float64)


def test_an_overlay_is_the_reference_blend_on_the_upright_original(client: httpx.Client) -> None:
    stored = drawn_image(31, (150, 90))  # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = ROTATED_90
    rotated = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    other = encode(drawn_image(32, (70, 110)), "PNG")
    options = {"format": "png", "opacity": "0.6", "colormap": "coolwarm", "include_heatmaps": "true"}
    response = client.post("/explain", files=pair_files(rotated, other), data=options)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    compared = 0
    for data, key in ((rotated, "image1"), (other, "image2")):
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        for target in ("factual", "counterfactual"):
            overlay = explanations[target][key]
            heatmap = np.array(overlay["heatmap"])
            if heatmap.max() == heatmap.min():
                continue  # a uniform map says nothing about where it is drawn
            picture = _picture(overlay["overlay"])
            assert picture.shape == upright.shape and (overlay["width"], overlay["height"]) == upright.shape[1::-1]
            difference = np.abs(picture - reference_blend(upright, heatmap, "coolwarm", 0.6))
            # The returned heatmap is rounded to 4 decimals, which can move a pixel to the neighbouring entry.
            assert difference.mean() < 0.5 and difference.max() <= 4, (key, target, difference.mean())
            compared += 1
    assert compared >= 2, "the model gave no non-uniform map to compare"


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_render_overlay_matches_the_reference_blend(colormap: str) -> None:
    rng = np.random.default_rng(1)
    # smooth like a photo at this size, so that JPEG's loss stays small
    background_rgb = np.asarray(drawn_image(33, (256, 192)).resize((1024, 768), Image.Resampling.BICUBIC))
    heatmap = _smooth_heatmap(2)
    background = cv2.cvtColor(background_rgb, cv2.COLOR_RGB2BGR)
    opacity = float(rng.uniform(0.3, 0.7))
    expected = reference_blend(background_rgb, heatmap, colormap, opacity)
    lossless = _picture(base64.b64encode(render_overlay(background, heatmap, colormap, opacity, "png", 80)))
    difference = np.abs(lossless - expected)
    assert difference.mean() < 0.6 and difference.max() <= 3, difference.mean()
    jpeg = _picture(base64.b64encode(render_overlay(background, heatmap, colormap, opacity, "jpeg", 95)))
    assert np.abs(jpeg - expected).mean() < 3, np.abs(jpeg - expected).mean()


def test_jpeg_is_the_default_and_quality_trades_size_for_fidelity(client: httpx.Client) -> None:
    files = pair_files(encode(drawn_image(34, (400, 300)), "JPEG"), encode(drawn_image(35, (300, 400)), "JPEG"))
    lossless = client.post("/explain", files=files, data={"format": "png"}).json()
    by_quality = {}
    for quality in (None, "20", "95"):
        response = client.post("/explain", files=files, data={"quality": quality} if quality else None)
        assert response.status_code == 200, response.text
        overlay = response.json()["explanations"]["factual"]["image1"]
        assert overlay["media_type"] == "image/jpeg"
        by_quality[quality] = overlay["overlay"]
    exact = _picture(lossless["explanations"]["factual"]["image1"]["overlay"])
    errors = {quality: np.abs(_picture(data) - exact).mean() for quality, data in by_quality.items()}
    assert len(by_quality["20"]) < len(by_quality[None]) < len(by_quality["95"])
    assert errors["95"] < errors[None] < errors["20"], errors


def test_a_12_megapixel_background_is_decoded_small_and_registers_with_the_original() -> None:
    data = phone_photo(36, (4000, 3000), orientation=ROTATED_90)
    background, original_size = overlay_background(data, "image1", None, 1024)
    assert background.shape == (1024, 768, 3) and original_size == (3000, 4000)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    expected = cv2.resize(upright, (768, 1024), interpolation=cv2.INTER_AREA).astype(np.float64)
    difference = np.abs(cv2.cvtColor(background, cv2.COLOR_BGR2RGB) - expected)
    assert difference.mean() < 1.5, difference.mean()


def test_both_endpoints_score_a_12_megapixel_pair_the_same(client: httpx.Client) -> None:
    """/explain decodes a second, larger picture for its overlays; the model's input must not change with it."""
    files = pair_files(phone_photo(37, orientation=ROTATED_90), phone_photo(38))
    similarity = client.post("/similarity", files=files)
    explanation = client.post("/explain", files=files)
    assert similarity.status_code == explanation.status_code == 200, explanation.text
    assert explanation.json()["score"] == pytest.approx(similarity.json()["score"], abs=1e-6)
    overlays = explanation.json()["explanations"]["factual"]
    assert (overlays["image1"]["width"], overlays["image1"]["height"]) == (768, 1024)
    assert (overlays["image2"]["width"], overlays["image2"]["height"]) == (1024, 768)


def test_the_web_page_legend_shows_the_service_tables() -> None:
    """app.js draws each colormap's legend from 7 colours: entries floor(k * 256 / 6) of the service's table."""
    script = APP_JS.read_text()
    for name in COLORMAPS:
        legend = re.search(rf"\b{name}: \[([^\]]*)\]", script)
        assert legend, f"app.js has no legend for {name}"
        table = rgb_table(name)
        expected = [bytes(table[min(255, k * 256 // 6)]).hex() for k in range(7)]
        assert re.findall(r"#([0-9a-f]{6})", legend.group(1)) == expected, name


def test_the_shipped_colormap_tables_are_matplotlibs() -> None:
    """The service ships the tables instead of matplotlib; they must stay what the generator writes."""
    assert (Path(__file__).resolve().parents[2] / "app" / "colormap_tables.py").read_text() == \
        colormap_tables.module_text()
