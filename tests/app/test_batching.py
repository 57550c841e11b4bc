"""The batching queue, for real: a lone pair runs at once, whatever MAX_BATCH_WAIT_MS; the pairs that arrive
while a batch runs form the next batch; batches do not change any result; a full queue answers 503, a request
that waits too long answers 504, and a client that leaves takes its pair back. Pairs are made to wait behind a
batch that surely runs by tests/app/busy_model.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.busy_model import model_kept_busy
from tests.app.failing_model import FAILING_MODEL_NAME, YELLOW
from tests.support.images import drawn_image, encode, pair_files
from tests.support.metrics import metric_value
from tests.support.waiting import wait_for

CONCURRENT = 32
LONG_WAIT_MS = 10_000  # a batch window no test waits out: pairs must run without waiting for it
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


@contextmanager
def _busy_service(serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path,
                  **settings: object) -> Iterator[tuple[str, httpx.Client]]:
    """A service on the failing test model, whose all-yellow pair keeps it busy (tests/app/busy_model.py)."""
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, **settings) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        yield url, client


def test_a_lone_pair_runs_at_once_whatever_the_batch_window(
    serve: Callable[..., AbstractContextManager[str]],
) -> None:
    """Batch size 1 latency: an idle model runs a pair at once; MAX_BATCH_WAIT_MS is not waited."""
    with serve(max_batch_size=16, max_batch_wait_ms=LONG_WAIT_MS) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        for files in PAIRS[:3]:
            waits_before = metric_value(client, "siamcam_queue_wait_seconds_sum", queue="similarity")
            batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
            started = time.monotonic()
            response = client.post("/similarity", files=files)
            elapsed_s = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert elapsed_s < LONG_WAIT_MS / 1000 / 4, f"a lone pair took {elapsed_s:.2f} s"
            queue_wait_s = metric_value(client, "siamcam_queue_wait_seconds_sum", queue="similarity") - waits_before
            # The only wait left is the event loop handing the pair to the worker (a busy shared CPU: generous).
            assert queue_wait_s < 0.5, f"a lone pair waited {queue_wait_s:.3f} s in the queue"
            assert response.json()["timings_ms"]["queue_wait"] < 500
            assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before + 1


def test_pairs_arriving_while_a_batch_runs_form_the_next_batch(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path,
) -> None:
    queued = 6
    with _busy_service(serve, failing_model_store, max_batch_size=4, max_batch_wait_ms=LONG_WAIT_MS) as (url, client):
        batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
        pairs_before = metric_value(client, "siamcam_batch_size_sum", queue="similarity")
        sizes_before = _batch_size_buckets(client)
        started = time.monotonic()
        with model_kept_busy(client) as still_busy, ThreadPoolExecutor(queued) as pool:
            answers = [pool.submit(client.post, "/similarity", files=files) for files in PAIRS[:queued]]
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == queued)
            assert still_busy(), "the busy batch ended before the pairs queued: make it longer"
            assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before
            statuses = [answer.result().status_code for answer in answers]
        assert statuses == [200] * queued
        assert time.monotonic() - started < LONG_WAIT_MS / 1000, "the pairs waited out the batch window"
        # Six waiting pairs, batches of at most four: one full batch, then the two left, at once.
        batches = metric_value(client, "siamcam_batch_size_count", queue="similarity") - batches_before
        pairs = metric_value(client, "siamcam_batch_size_sum", queue="similarity") - pairs_before
        assert (batches, pairs) == (2, queued)
        sizes = [after - before for after, before in zip(_batch_size_buckets(client), sizes_before, strict=True)]
        assert sizes == [0, 1, 2], f"batch sizes: {sizes} of at most 1, 2 and 4 pairs (cumulative)"


def _batch_size_buckets(client: httpx.Client) -> list[float]:
    """How many similarity batches had at most 1, 2 and 4 pairs."""
    return [metric_value(client, "siamcam_batch_size_bucket", queue="similarity", le=le)
            for le in ("1.0", "2.0", "4.0")]


@pytest.mark.parametrize(("max_batch_wait_ms", "full_batch_first"), [(LONG_WAIT_MS, True), (0, False)])
def test_a_full_batch_goes_first_until_a_partial_one_has_waited_max_batch_wait_ms(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path, max_batch_wait_ms: int,
    full_batch_first: bool,
) -> None:
    """Behind a busy model, one /similarity pair (a partial batch), then two /explain pairs (a full batch of two,
    all yellow, so that it runs a second or more). The full batch goes first unless the partial one is overdue:
    with MAX_BATCH_WAIT_MS at 0 it is at once, and the oldest goes first."""
    with _busy_service(serve, failing_model_store, max_batch_size=2, max_batch_wait_ms=max_batch_wait_ms) as \
            (url, client), ThreadPoolExecutor(3) as pool:
        with model_kept_busy(client) as still_busy:
            partial = pool.submit(client.post, "/similarity", files=PAIRS[0])
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 1)
            full = [pool.submit(client.post, "/explain", files=pair_files(YELLOW, YELLOW)) for _ in range(2)]
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="explain") == 2)
            assert still_busy(), "the busy batch ended before the pairs queued"
        answers = [partial.result(), *(answer.result() for answer in full)]
        assert [answer.status_code for answer in answers] == [200] * 3
        partial_wait_s, *full_waits_s = (answer.json()["timings_ms"]["queue_wait"] / 1000 for answer in answers)
        # Queued earlier, the similarity pair waited as long as the explain pairs, plus their batch if it ran second.
        ran_second = partial_wait_s - max(full_waits_s) > 0.5
        assert ran_second == full_batch_first, f"waits: partial {partial_wait_s:.2f} s, full {full_waits_s}"


def test_a_full_queue_answers_503(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path,
) -> None:
    with _busy_service(serve, failing_model_store, queue_capacity=2, max_batch_size=8) as (url, client), \
            ThreadPoolExecutor(3) as pool:
        refused_before = metric_value(client, "siamcam_rejections_total", reason="queue_full")
        with model_kept_busy(client):
            queued = [pool.submit(client.post, "/similarity", files=files) for files in PAIRS[:2]]
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 2)
            refused = client.post("/similarity", files=PAIRS[2])
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert [answer.result().status_code for answer in queued] == [200, 200]
        assert metric_value(client, "siamcam_rejections_total", reason="queue_full") == refused_before + 1


def test_a_request_waiting_too_long_answers_504_and_is_dropped(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path,
) -> None:
    timeout_s = 0.5
    with _busy_service(serve, failing_model_store, request_timeout_s=timeout_s) as (url, client):
        batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
        with model_kept_busy(client) as still_busy:
            started = time.monotonic()
            response = client.post("/similarity", files=PAIRS[0])
            elapsed_s = time.monotonic() - started
            batch_still_running = still_busy()
        assert response.status_code == 504, response.text
        assert batch_still_running and elapsed_s < timeout_s + 2, "answered when the batch ran, not at the timeout"
        # Dropped before it started: out of the queue, and no batch ever runs it.
        assert metric_value(client, "siamcam_queue_depth", queue="similarity") == 0
        assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before


def test_a_client_that_disconnects_has_its_pair_dropped(
    serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path,
) -> None:
    with _busy_service(serve, failing_model_store) as (url, client):
        gone_before = metric_value(client, "siamcam_rejections_total", reason="disconnected")
        batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")

        async def leave_while_queued() -> None:
            task = asyncio.create_task(_post_all(url, "/similarity", PAIRS[:1]))
            await asyncio.to_thread(
                wait_for, lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 1)
            task.cancel()  # closes the connection

        with model_kept_busy(client):
            asyncio.run(leave_while_queued())
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 0, timeout_s=5)
        assert metric_value(client, "siamcam_rejections_total", reason="disconnected") == gone_before + 1
        assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before
