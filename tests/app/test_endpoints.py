"""Both inference endpoints and the operational ones, over real HTTP on the real small model."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from starlette.requests import Request

from app.main import create_app
from app.model import load_model
from app.overlays import COLORMAPS
from app.settings import Settings
from tests.support.images import drawn_image, encode, pair_files
from bench.gradcam_reference import as_loaded, pytorch_grad_cam_maps
from tests.conftest import SHARED_DATASETS, DrawnPair, drawn_pair

FLOWERS = SHARED_DATASETS / "flowers"


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"} and body["status"] == status
    return body


def test_similarity_scores_a_jpeg_and_a_png_pair(client: httpx.Client, decided_pair: DrawnPair) -> None:
    """Catches a service that decides every pair alike (or the wrong way round), that scores the images in the
    wrong order, or that reports a score its decision does not follow."""
    response = client.post("/similarity", files=decided_pair.files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["similar"] == decided_pair.similar and body["threshold"] == 0.5
    # tiny's pairs of one class score above 0.8, of two classes below 0.2 (tests/support/colour_model.py).
    assert body["score"] > 0.8 if decided_pair.similar else body["score"] < 0.2
    assert body["model"] == {"name": "tiny", "version": "0.0.1"}
    timings = body["timings_ms"]
    assert 0 <= timings["queue_wait"] <= timings["total"] and 0 < timings["inference"] <= timings["total"]
    # The same pair the other way round scores the same: the similarity is symmetric.
    first, second = decided_pair.files["image1"][1], decided_pair.files["image2"][1]
    swapped = client.post("/similarity", files=pair_files(second, first))
    assert swapped.json()["score"] == pytest.approx(body["score"], abs=1e-5)


def _decode_overlay(overlay: dict) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(overlay["overlay"])))
    assert (picture.width, picture.height) == (overlay["width"], overlay["height"])
    return picture


def test_explain_returns_four_overlays_at_each_images_aspect_ratio(client: httpx.Client) -> None:
    wide, tall = drawn_image(3, (300, 100)), drawn_image(4, (60, 90))
    files = pair_files(encode(wide, "PNG"), encode(tall, "JPEG"))
    response = client.post("/explain", files=files, data={"max_side": "150"})
    assert response.status_code == 200, response.text
    body = response.json()
    score = client.post("/similarity", files=files).json()["score"]
    assert body["score"] == pytest.approx(score, abs=1e-5)
    factual, counterfactual = body["explanations"]["factual"], body["explanations"]["counterfactual"]
    assert factual["target"] == ("similar" if body["similar"] else "dissimilar")
    assert {factual["target"], counterfactual["target"]} == {"similar", "dissimilar"}
    for explanation in (factual, counterfactual):
        first, second = explanation["image1"], explanation["image2"]
        # Longest side capped at 150, never enlarged, aspect ratio kept.
        assert (first["width"], first["height"]) == (150, 50)
        assert (second["width"], second["height"]) == (60, 90)
        for overlay in (first, second):
            assert overlay["media_type"] == "image/jpeg" and overlay["heatmap"] is None
            assert _decode_overlay(overlay).format == "JPEG"


def test_explanations_target_the_decision_and_match_pytorch_grad_cam(client: httpx.Client, model_store: Path,
                                                                    decided_pair: DrawnPair) -> None:
    """Catches a service that always explains "similar" (or swaps factual and counterfactual) on either decision:
    each raw heatmap it returns must be pytorch-grad-cam's map for the target it names, on the same images."""
    response = client.post("/explain", files=decided_pair.files, data={"include_heatmaps": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["similar"] == decided_pair.similar
    explanations = body["explanations"]
    opposite = "dissimilar" if decided_pair.similar else "similar"
    assert (explanations["factual"]["target"], explanations["counterfactual"]["target"]) == \
        (decided_pair.decision, opposite)
    served = load_model(model_store / "tiny", "cpu")
    x1, x2 = (served.preprocess(Image.open(path).convert("RGB"))[None]
              for path in (decided_pair.image1, decided_pair.image2))
    reference = pytorch_grad_cam_maps(as_loaded(served), x1, x2, decided_pair.similar)
    compared = 0
    for kind in ("factual", "counterfactual"):
        for image in (1, 2):
            returned = np.array(explanations[kind][f"image{image}"]["heatmap"])
            theirs = reference[f"{kind}{image}"]
            if theirs.max() < 1e-3:  # no positive evidence for this target: ours must be blank and say so
                assert returned.max() == 0 and explanations[kind][f"image{image}"]["no_positive_evidence"]
                continue
            assert np.corrcoef(returned.ravel(), theirs.ravel())[0, 1] > 0.98, f"{kind}{image}"
            compared += 1
    assert compared >= 3  # the factual maps and at least one counterfactual one carry evidence


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_explain_formats_options_and_raw_heatmaps(client: httpx.Client, fmt: str, tmp_path: Path) -> None:
    files = drawn_pair("similar", tmp_path).files  # the factual maps of a similar pair are never blank
    options = {"format": fmt, "opacity": "1", "colormap": "gray", "include_heatmaps": "true"}
    body = client.post("/explain", files=files, data=options).json()
    overlay = body["explanations"]["factual"]["image1"]
    assert overlay["media_type"] == f"image/{fmt}"
    assert _decode_overlay(overlay).format == fmt.upper()
    heatmap = np.array(overlay["heatmap"])
    assert heatmap.shape == (128, 128) and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert overlay["no_positive_evidence"] == (heatmap.max() == 0)
    # Opacity 1 with the gray colormap: the overlay is the heatmap itself, stretched over the image.
    picture = np.asarray(_decode_overlay(overlay).convert("L"), dtype=np.float64) / 255
    stretched = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(picture.shape[::-1]))
    assert np.corrcoef(picture.ravel(), stretched.ravel())[0, 1] > 0.95


def test_model_health_readiness_and_request_ids(client: httpx.Client) -> None:
    model = client.get("/model").json()
    assert model["name"] == "tiny" and model["input_size"] == [128, 128] and model["backbone"] == "colour-detectors"
    assert model["format_version"] == 2 and model["explain_methods"] == ["gradcam", "contributions"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    echoed = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_metrics_count_requests_batches_and_queues(client: httpx.Client) -> None:
    client.post("/similarity", files=pair_files(encode(drawn_image(7)), encode(drawn_image(8))))
    text = client.get("/metrics").text
    assert re.search(r'siamcam_requests_total\{method="POST",route="/similarity",status="200"\} [1-9]', text)
    for name in ("siamcam_request_duration_seconds_bucket", 'siamcam_queue_depth{queue="explain"}',
                 'siamcam_queue_wait_seconds_count{queue="similarity"}', 'siamcam_batch_size_bucket',
                 'siamcam_inference_seconds_count{queue="similarity"}'):
        assert name in text, name


def test_errors_share_one_shape(client: httpx.Client) -> None:
    assert "nothing at this path" in _problem(client.get("/no/such/page"), 404)["detail"]
    _problem(client.get("/similarity"), 405)


def test_web_page_and_static_files_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/index.html").text == page.text


def test_docs_work_offline(client: httpx.Client) -> None:
    """/docs and /redoc, and every file they load, come from this service: nothing from the internet."""
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.search(r"https?://", html), f"{page} names an external URL"
        assets = re.findall(r'(?:src|href)=["\']?([^"\' >]+)', html) + re.findall(r"url: ?'([^']+)'", html)
        assert any(asset.endswith(".js") for asset in assets), f"{page} loads no script?"
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset}"
            response = client.get(asset)
            assert response.status_code == 200, asset
            # Scripts and styles must not fetch anything else from a CDN or font service either.
            assert not re.search(r"(cdn\.jsdelivr|unpkg\.com|fonts\.googleapis|fonts\.gstatic)", response.text)
    schema = client.get("/openapi.json").json()
    explain_form = schema["paths"]["/explain"]["post"]
    assert "examples" in str(schema["components"]["schemas"]["SimilarityResponse"])
    assert "application/problem+json" in str(explain_form["responses"]["415"])


@pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"the flowers dataset is not at {FLOWERS}")
def test_explain_real_photos(client: httpx.Client) -> None:
    photos = sorted(path for path in FLOWERS.rglob("*") if path.suffix.lower() in {".jpg", ".jpeg", ".png"})[:2]
    response = client.post("/explain", files=pair_files(photos[0].read_bytes(), photos[1].read_bytes()))
    assert response.status_code == 200, response.text
    originals = [ImageOps.exif_transpose(Image.open(photo)) for photo in photos]
    for original, key in zip(originals, ("image1", "image2"), strict=True):
        overlay = response.json()["explanations"]["factual"][key]
        assert overlay["width"] / overlay["height"] == pytest.approx(original.width / original.height, rel=0.02)


def test_every_offered_colormap_is_drawn(client: httpx.Client, tmp_path: Path) -> None:
    files = drawn_pair("dissimilar", tmp_path).files
    overlays = set()
    for colormap in COLORMAPS:
        response = client.post("/explain", files=files, data={"colormap": colormap, "opacity": "1"})
        assert response.status_code == 200, f"{colormap}: {response.text}"
        overlays.add(response.json()["explanations"]["factual"]["image1"]["overlay"])
    assert len(overlays) == len(COLORMAPS)  # each one colours the map differently


def test_uploads_up_to_the_limit_are_parsed_in_memory_not_spooled_to_disk() -> None:
    """What app.main.keep_uploads_in_memory relies on: Starlette's parser honours its class attribute."""
    create_app(Settings(max_upload_bytes=4 << 20))
    boundary = b"siamcam-boundary"

    def part(field: str, size: int) -> bytes:
        return (b"--" + boundary + f'\r\nContent-Disposition: form-data; name="{field}"; filename="{field}.jpg"'
                f"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + bytes(size) + b"\r\n")

    body = part("image1", 3 << 20) + part("image2", 5 << 20) + b"--" + boundary + b"--\r\n"

    async def parsed() -> dict[str, bool]:
        chunks = iter([body[start:start + 65536] for start in range(0, len(body), 65536)] + [b""])

        async def receive() -> dict:
            chunk = next(chunks)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        scope = {"type": "http", "method": "POST",
                 "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)]}
        async with Request(scope, receive).form() as form:
            return {field: form[field].file._rolled for field in ("image1", "image2")}  # type: ignore[union-attr]

    # on disk only past the limit (such an upload is then refused with 413)
    assert asyncio.run(parsed()) == {"image1": False, "image2": True}
