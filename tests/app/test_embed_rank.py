"""/embed and /rank over real HTTP on the real small model: embeddings that reproduce /similarity (docs/api.md's
snippet, run as written), rankings that agree with /similarity and explanations that agree with /explain, and
their limits, bad input and overload answers."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.model import EMBED_QUEUE
from app.settings import Settings
from tests.app.busy_model import model_kept_busy
from tests.app.failing_model import FAILING_MODEL_NAME, YELLOW
from tests.support.images import drawn_image, encode, pair_files
from tests.support.model_folders import with_version1_module
from tests.support.metrics import metric_value
from tests.support.service import serve_in_thread
from tests.support.waiting import wait_for

API_DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "api.md"
SCORE_TOLERANCE = 1e-5
QUERY = encode(drawn_image(40, (120, 90)), "JPEG")
CANDIDATES = [encode(drawn_image(seed, (80 + 8 * seed % 50, 64)), "PNG") for seed in range(41, 47)]


def _candidates(images: list[bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("candidates", (f"candidate-{index}.png", data)) for index, data in enumerate(images)]


def _rank(client: httpx.Client, images: list[bytes], **form: object) -> httpx.Response:
    return client.post("/rank", files=[("query", ("query.jpg", QUERY)), *_candidates(images)],
                       data={key: str(value) for key, value in form.items()})


def _problem(response: httpx.Response, status: int, slug: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == f"urn:siamcam:problem:{slug}", response.json()
    return response.json()["detail"]


def _readme_snippet() -> str:
    """docs/api.md's Python block that scores two /embed embeddings, as a reader would copy it."""
    text = API_DOCUMENT.read_text()
    (snippet,) = re.findall(r"<!-- embedding-scoring-snippet -->\n```python\n(.*?)```", text, re.DOTALL)
    return snippet


def test_the_documented_snippet_reproduces_similarity_from_two_embeddings(
    client: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = _readme_snippet()
    assert 'url = "http://localhost:8000"' in snippet
    monkeypatch.chdir(tmp_path)
    for first, second in [(QUERY, CANDIDATES[0]), (CANDIDATES[1], CANDIDATES[2]), (CANDIDATES[3], CANDIDATES[3])]:
        (tmp_path / "a.jpg").write_bytes(first)
        (tmp_path / "b.jpg").write_bytes(second)
        namespace: dict[str, object] = {}
        exec(snippet.replace("http://localhost:8000", str(client.base_url).rstrip("/")), namespace)  # noqa: S102
        served = client.post("/similarity", files=pair_files(first, second)).json()
        assert abs(namespace["score"] - served["score"]) <= SCORE_TOLERANCE, (namespace["score"], served["score"])
        assert (namespace["score"] >= served["threshold"]) == served["similar"]


def test_embed_answers_one_embedding_per_image_in_the_upload_order(client: httpx.Client) -> None:
    model = client.get("/model").json()
    images = [CANDIDATES[0], QUERY, CANDIDATES[0]]
    response = client.post("/embed", files=[("images", (f"img{index}", data)) for index, data in enumerate(images)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": model["name"], "version": model["version"], "sha256": model["sha256"]}
    assert body["embedding_dim"] == model["embedding_dim"]
    assert [item["index"] for item in body["embeddings"]] == [0, 1, 2]
    assert [item["filename"] for item in body["embeddings"]] == ["img0", "img1", "img2"]
    vectors = [np.array(item["embedding"]) for item in body["embeddings"]]
    assert all(vector.shape == (model["embedding_dim"],) and np.isfinite(vector).all() for vector in vectors)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)  # the same image, whatever its neighbours
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3
    assert body["timings_ms"]["inference"] > 0


def test_model_publishes_the_scoring_of_embeddings(client: httpx.Client) -> None:
    model = client.get("/model").json()
    scoring = model["embedding_scoring"]
    assert scoring["max_logit"] == 15.0 and scoring["threshold"] == model["threshold"]
    assert re.fullmatch(r"[0-9a-f]{64}", model["sha256"])
    # At the published dot product the published formula gives the threshold back.
    raw = scoring["pair_weight"] * scoring["threshold_dot_product"] + scoring["offset"]
    squashed = raw / np.sqrt(1 + (raw / scoring["max_logit"]) ** 2)
    assert abs(1 / (1 + np.exp(-squashed)) - scoring["threshold"]) <= 1e-6


def test_rank_orders_every_candidate_as_similarity_scores_it(client: httpx.Client) -> None:
    response = _rank(client, CANDIDATES, explain_top=0)
    assert response.status_code == 200, response.text
    body = response.json()
    ranked = body["candidates"]
    assert sorted(item["index"] for item in ranked) == list(range(len(CANDIDATES)))
    scores = [item["score"] for item in ranked]
    assert scores == sorted(scores, reverse=True)
    assert body["query_filename"] == "query.jpg"
    for item in ranked:
        assert item["filename"] == f"candidate-{item['index']}.png"
        assert item["explanation"] is None
        alone = client.post("/similarity", files=pair_files(QUERY, CANDIDATES[item["index"]])).json()
        assert abs(item["score"] - alone["score"]) <= SCORE_TOLERANCE
        assert item["similar"] == (item["score"] >= body["threshold"])


@pytest.mark.parametrize("method", ["gradcam", "contributions"])
def test_rank_explains_the_best_candidates_as_explain_does(client: httpx.Client, method: str) -> None:
    options = {"method": method, "include_heatmaps": "true", "max_side": 64, "format": "png"}
    body = _rank(client, CANDIDATES, explain_top=2, **options).json()
    explained = [item for item in body["candidates"] if item["explanation"] is not None]
    assert explained == body["candidates"][:2]
    for item in explained:
        ours = item["explanation"]
        theirs = client.post("/explain", files=pair_files(QUERY, CANDIDATES[item["index"]]), data=options).json()
        assert ours["method"] == method
        for kind in ("factual", "counterfactual"):
            assert ours["explanations"][kind]["target"] == theirs["explanations"][kind]["target"]
            for image in ("image1", "image2"):
                mine, reference = ours["explanations"][kind][image], theirs["explanations"][kind][image]
                assert (mine["width"], mine["height"], mine["media_type"]) == \
                    (reference["width"], reference["height"], "image/png")
                np.testing.assert_allclose(mine["heatmap"], reference["heatmap"], atol=1e-4)
        if method == "contributions":
            assert [match["image2_box"] for match in ours["contributions"]["matches"]] == \
                [match["image2_box"] for match in theirs["contributions"]["matches"]]
        else:
            assert ours["contributions"] is None


def test_too_many_images_are_refused_saying_the_limit(serve: Callable[..., AbstractContextManager[str]]) -> None:
    with serve(max_rank_candidates=3, max_embed_images=2) as url, \
            httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        detail = _problem(_rank(client, CANDIDATES[:4]), 413, "too-many-images")
        assert "4" in detail and "limit is 3" in detail and "MAX_RANK_CANDIDATES" in detail
        files = [("images", ("x.png", data)) for data in CANDIDATES[:3]]
        assert "MAX_EMBED_IMAGES" in _problem(client.post("/embed", files=files), 413, "too-many-images")
        assert _rank(client, CANDIDATES[:3]).status_code == 200
        assert client.post("/embed", files=files[:2]).status_code == 200


@pytest.mark.parametrize(("data", "status", "slug"), [
    (encode(drawn_image(50, (200, 150)), "JPEG")[:700], 422, "corrupt-image"),
    (b"not an image at all", 415, "not-an-image"),
])
def test_an_unreadable_candidate_is_named_by_index_and_file_name(
    client: httpx.Client, data: bytes, status: int, slug: str
) -> None:
    images = [*CANDIDATES[:3], data, CANDIDATES[4]]
    detail = _problem(_rank(client, images), status, slug)
    assert "candidates[3] (candidate-3.png)" in detail
    detail = _problem(client.post("/embed", files=[("images", ("good.png", CANDIDATES[0])),
                                                   ("images", ("broken.jpg", data))]), status, slug)
    assert "images[1] (broken.jpg)" in detail
    assert _rank(client, CANDIDATES[:3]).status_code == 200


@pytest.mark.parametrize(("endpoint", "files", "data", "field"), [
    ("/similarity", [("image1", QUERY), ("image1", QUERY), ("image2", QUERY)], {}, "image1"),
    ("/explain", [("image1", QUERY), ("image2", QUERY), ("image2", QUERY)], {}, "image2"),
    ("/rank", [("query", QUERY), ("query", QUERY), ("candidates", QUERY)], {}, "query"),
    ("/explain", [("image1", QUERY), ("image2", QUERY)], {"opacity": ["0.1", "0.9"]}, "opacity"),
    ("/rank", [("query", QUERY), ("candidates", QUERY)], {"explain_top": ["1", "2"]}, "explain_top"),
])
def test_a_field_sent_twice_is_refused(client: httpx.Client, endpoint: str, files: list, data: dict,
                                       field: str) -> None:
    response = client.post(endpoint, files=[(name, ("f.jpg", content)) for name, content in files], data=data)
    assert f"{field} (2 times)" in _problem(response, 422, "repeated-field")


def test_the_pixels_of_every_image_are_admitted_and_given_back(client: httpx.Client) -> None:
    admitted_before = metric_value(client, "siamcam_decode_pixels_admitted_total")
    batches_before = metric_value(client, "siamcam_batch_size_sum", queue=EMBED_QUEUE)
    images = CANDIDATES[:5]
    assert _rank(client, images, explain_top=1).status_code == 200
    # The query and five candidates: charged for the images decoded at once (IMAGE_WORKERS of them, at least 2).
    pixels = sorted((drawn_image_pixels(data) for data in [QUERY, *images]), reverse=True)
    at_once = max(2, len(os.sched_getaffinity(0)))
    assert metric_value(client, "siamcam_decode_pixels_admitted_total") - admitted_before == sum(pixels[:at_once])
    assert metric_value(client, "siamcam_decode_pixels_in_flight") == 0
    assert metric_value(client, "siamcam_batch_size_sum", queue=EMBED_QUEUE) - batches_before == 6


def test_images_that_could_never_be_decoded_at_once_get_422(serve: Callable[..., AbstractContextManager[str]]) -> None:
    pixels = [drawn_image_pixels(data) for data in [QUERY, *CANDIDATES]]
    largest_two = sum(sorted(pixels[:4], reverse=True)[:2])  # the query and three candidates, two threads
    with serve(image_workers=2, max_decode_pixels_in_flight=largest_two - 1) as url, \
            httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        detail = _problem(_rank(client, CANDIDATES[:3]), 422, "images-too-large")
        assert f"the 2 largest of these 4 images, decoded side by side, hold {largest_two:,} pixels" in detail
        assert metric_value(client, "siamcam_decode_pixels_in_flight") == 0
        # Smaller candidates fit: however many images a request sends, only two are decoded at once.
        assert sum(sorted([pixels[0], *pixels[4:]], reverse=True)[:2]) < largest_two
        assert _rank(client, CANDIDATES[3:]).status_code == 200


def drawn_image_pixels(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return image.width * image.height


def test_a_full_queue_answers_503_before_any_decoding(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path
) -> None:
    # The embed queue holds 8 images (2 x QUEUE_CAPACITY, and one request's most), its batches 1 (MAX_BATCH_SIZE).
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, queue_capacity=4, max_batch_size=1,
               max_rank_candidates=3, max_embed_images=8) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client, ThreadPoolExecutor(1) as pool:
        # Eight all-yellow images: eight batches, each keeping the model busy half a second or more
        # (tests/app/failing_model.py); seven of them wait while the first batch runs.
        busy = pool.submit(client.post, "/embed", files=[("images", ("yellow.png", YELLOW))] * 8)
        wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue=EMBED_QUEUE) == 7)
        refused = _rank(client, CANDIDATES[:3], explain_top=0)  # four images: no room for them all
        assert metric_value(client, "siamcam_queue_depth", queue=EMBED_QUEUE) >= 5, "the yellow images still wait"
        assert "at capacity" in _problem(refused, 503, "service-unavailable")
        assert refused.headers["retry-after"] == "1"
        assert len(busy.result().json()["embeddings"]) == 8
        assert metric_value(client, "siamcam_queue_depth", queue=EMBED_QUEUE) == 0
        assert _rank(client, CANDIDATES[:3]).status_code == 200


def test_a_request_not_answered_in_time_gets_504_and_its_images_leave_the_queue(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path
) -> None:
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, request_timeout_s=0.5) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        with model_kept_busy(client) as still_busy:  # a batch longer than REQUEST_TIMEOUT_S
            timed_out = client.post("/embed", files=[("images", ("a.png", data)) for data in CANDIDATES[:3]])
            assert metric_value(client, "siamcam_queue_depth", queue=EMBED_QUEUE) == 0
            wait_for(lambda: not still_busy())
        _problem(timed_out, 504, "timeout")
        assert client.post("/embed", files=[("images", ("a.png", CANDIDATES[0]))]).status_code == 200


def test_a_version_1_model_embeds_and_ranks_without_publishing_its_scoring(model_store: Path,
                                                                             tmp_path: Path) -> None:
    with_version1_module(model_store / "tiny", tmp_path / "old")
    with serve_in_thread(Settings(model_store=tmp_path, model_name="old")) as url, \
            httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        assert client.get("/model").json()["embedding_scoring"] is None
        embedded = client.post("/embed", files=[("images", ("a.png", data)) for data in CANDIDATES[:2]])
        assert [len(item["embedding"]) for item in embedded.json()["embeddings"]] == [16, 16]
        ranked = _rank(client, CANDIDATES[:3]).json()["candidates"]
        for item in ranked:
            alone = client.post("/similarity", files=pair_files(QUERY, CANDIDATES[item["index"]])).json()
            assert abs(item["score"] - alone["score"]) <= SCORE_TOLERANCE
        assert ranked[0]["explanation"]["method"] == "gradcam"
        refused = _rank(client, CANDIDATES[:3], method="contributions")
        assert "format_version 1" in _problem(refused, 422, "method-unavailable")
        assert _rank(client, CANDIDATES[:3], method="contributions", explain_top=0).status_code == 200
