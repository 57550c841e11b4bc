"""The batching queue, for real: batches form under concurrency without changing any result, a full queue
answers 503, a request that waits too long answers 504, and a client that leaves takes its pair back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import numpy as np

from tests.support.images import drawn_image, encode, pair_files
from tests.support.metrics import metric_value

CONCURRENT = 32
IMAGES = [encode(drawn_image(100 + seed, (48, 48)), "PNG") for seed in range(CONCURRENT + 1)]
PAIRS = [pair_files(IMAGES[i], IMAGES[i + 1]) for i in range(CONCURRENT)]


async def _post_all(url: str, path: str, pairs: list[dict], data: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
        return await asyncio.gather(*(client.post(path, files=files, data=data) for files in pairs))


def test_concurrent_requests_are_batched_with_the_same_results(service_url: str, client: httpx.Client) -> None:
    batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
    pairs_before = metric_value(client, "siamcam_batch_size_sum", queue="similarity")
    concurrent = asyncio.run(_post_all(service_url, "/similarity", PAIRS))
    batches = metric_value(client, "siamcam_batch_size_count", queue="similarity") - batches_before
    pairs = metric_value(client, "siamcam_batch_size_sum", queue="similarity") - pairs_before
    assert all(response.status_code == 200 for response in concurrent)
    assert pairs == CONCURRENT and batches < CONCURRENT, "no batch of more than one pair was formed"
    one_at_a_time = [client.post("/similarity", files=files) for files in PAIRS]
    for together, alone in zip(concurrent, one_at_a_time, strict=True):
        assert together.json()["score"] == alone.json()["score"] or \
            abs(together.json()["score"] - alone.json()["score"]) <= 1e-6


def test_concurrent_explanations_match_one_at_a_time(service_url: str, client: httpx.Client) -> None:
    form = {"include_heatmaps": "true"}
    concurrent = asyncio.run(_post_all(service_url, "/explain", PAIRS[:6], form))
    for together, files in zip(concurrent, PAIRS[:6], strict=True):
        alone = client.post("/explain", files=files, data=form).json()
        for kind in ("factual", "counterfactual"):
            assert together.json()["explanations"][kind]["target"] == alone["explanations"][kind]["target"]
            for image in ("image1", "image2"):
                ours = np.array(together.json()["explanations"][kind][image]["heatmap"])
                theirs = np.array(alone["explanations"][kind][image]["heatmap"])
                # Sent rounded to 4 decimals: a 1e-5 difference may still round one step apart.
                assert np.abs(ours - theirs).max() <= 1e-4 + 1e-5


def test_a_full_queue_answers_503(serve: Callable[..., AbstractContextManager[str]]) -> None:
    # A long batch window keeps the first pairs queued while the third arrives.
    with serve(queue_capacity=2, max_batch_size=8, max_batch_wait_ms=4000) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        refused_before = metric_value(client, "siamcam_rejections_total", reason="queue_full")
        responses = asyncio.run(_post_all(url, "/similarity", PAIRS[:3]))
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200, 200, 503]
        refused = next(response for response in responses if response.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert metric_value(client, "siamcam_rejections_total", reason="queue_full") == refused_before + 1


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the service"
        time.sleep(0.05)


def test_a_request_waiting_too_long_answers_504_and_is_dropped(
    serve: Callable[..., AbstractContextManager[str]],
) -> None:
    with serve(request_timeout_s=0.5, max_batch_size=8, max_batch_wait_ms=3000) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
        started = time.monotonic()
        response = client.post("/similarity", files=PAIRS[0])
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 3, "answered when the batch ran, not at the timeout"
        # Dropped before it started: out of the queue, and no batch ever runs it.
        assert metric_value(client, "siamcam_queue_depth", queue="similarity") == 0
        time.sleep(3.5)
        assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before


def test_a_client_that_disconnects_has_its_pair_dropped(serve: Callable[..., AbstractContextManager[str]]) -> None:
    with serve(max_batch_size=8, max_batch_wait_ms=10_000) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        gone_before = metric_value(client, "siamcam_rejections_total", reason="disconnected")

        async def leave_while_queued() -> None:
            task = asyncio.create_task(_post_all(url, "/similarity", PAIRS[:1]))
            await asyncio.to_thread(
                _wait_for, lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 1)
            task.cancel()  # closes the connection

        asyncio.run(leave_while_queued())
        _wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 0, timeout_s=5)
        assert metric_value(client, "siamcam_rejections_total", reason="disconnected") == gone_before + 1
