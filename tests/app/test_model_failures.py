"""When the model fails: a traceable 500 for the pair that failed (and only for it), and a replica that says it
is not ready, and answers 503 at once, when the model is broken for good. On tests/app/failing_model.py's real
model, served over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.app.busy_model import model_kept_busy
from tests.app.failing_model import BLUE, FAILING_MODEL_NAME, GREEN, RED
from tests.support.images import drawn_image, encode, pair_files
from tests.support.metrics import metric_value
from tests.support.waiting import wait_for

GOOD1, GOOD2 = encode(drawn_image(41), "PNG"), encode(drawn_image(42), "JPEG")
Serve = Callable[..., AbstractContextManager[str]]


def _problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:siamcam:problem:{slug}" and body["status"] == status and body["detail"]
    return body


def _local_port(response: httpx.Response) -> int | None:
    """The client side's port of the connection that carried `response`; None once that connection is closed."""
    try:
        return response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
    except OSError:
        return None


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, trust_env=False)


def test_a_failing_model_gets_a_traceable_500_and_the_service_keeps_serving(
    serve: Serve, failing_model_store: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME) as url, _client(url) as client:
        errors_before = metric_value(client, "siamcam_requests_total", route="/similarity", method="POST",
                                     status="500")
        failed = client.post("/similarity", files=pair_files(GOOD1, RED), headers={"X-Request-ID": "red-pair-1"})
        failed_on = _local_port(failed)
        assert failed_on is not None, "the connection was closed after the 500"
        body = _problem(failed, 500, "internal-error")
        assert failed.headers["X-Request-ID"] == "red-pair-1"
        assert "red-pair-1" in body["detail"]  # what the user quotes when reporting it
        assert metric_value(client, "siamcam_requests_total", route="/similarity", method="POST",
                            status="500") == errors_before + 1
        _problem(client.post("/explain", files=pair_files(RED, GOOD2)), 500, "internal-error")
        # Its overlay backgrounds are decoded only after a batch that succeeds: never, here, and the pixels they
        # held in the decode budget are given back.
        wait_for(lambda: metric_value(client, "siamcam_decode_pixels_in_flight") == 0)
        # The model still scores other pairs, on the same connection: it was not dropped after the 500.
        scored = client.post("/similarity", files=pair_files(GOOD1, GOOD2))
        assert scored.status_code == 200
        assert _local_port(scored) == failed_on
        assert client.post("/explain", files=pair_files(GOOD1, GOOD2)).status_code == 200
        assert client.get("/readyz").status_code == 200
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    failure = [line for line in logged if line["message"] == "unexpected error"]
    assert len(failure) == 2, logged  # /similarity's, then /explain's
    assert failure[0]["request_id"] == "red-pair-1" and failure[0]["level"] == "ERROR"
    assert "cannot take a red image" in failure[0]["exc_info"]  # the model's own error, for the operator
    answered = [line for line in logged if line["message"] == "request" and line["request_id"] == "red-pair-1"]
    assert [line["status"] for line in answered] == [500]


def test_one_failing_pair_fails_alone_in_a_batch_of_good_pairs(serve: Serve, failing_model_store: Path) -> None:
    """A batch that fails (here: the model raises on one pair, or returns a score too many) is run again one
    pair at a time: only the pairs that fail on their own get a 500, the others their scores."""
    good1, good2 = (GOOD1, GOOD2), (GOOD2, GOOD1)
    # Four pairs queued behind a busy model, in batches of at most four: they run as one batch.
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, max_batch_size=4) as url, \
            _client(url) as client, ThreadPoolExecutor(4) as pool:

        def one_batch(*pairs: tuple[bytes, bytes]) -> list[httpx.Response]:
            batches_before = metric_value(client, "siamcam_batch_size_count", queue="similarity")
            with model_kept_busy(client) as still_busy:
                futures = [pool.submit(client.post, "/similarity", files=pair_files(*pair)) for pair in pairs]
                wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == len(pairs))
                assert still_busy(), "the busy batch ended before the pairs queued"
            answers = [future.result() for future in futures]
            assert metric_value(client, "siamcam_batch_size_count", queue="similarity") == batches_before + 1
            return answers

        reference = one_batch(good1, good2, good1, good2)
        red, green, mixed1, mixed2 = one_batch((RED, GOOD1), (GREEN, GOOD2), good1, good2)
        _problem(red, 500, "internal-error")
        _problem(green, 500, "internal-error")
        for mixed, expected in ((mixed1, reference[0]), (mixed2, reference[1])):
            assert mixed.status_code == 200, mixed.text
            assert mixed.json()["score"] == pytest.approx(expected.json()["score"], abs=1e-5)
        assert client.get("/readyz").status_code == 200
        assert [answer.status_code for answer in one_batch(good1, good2, good1, good2)] == [200] * 4


def test_a_broken_model_stops_the_worker_and_every_request_gets_503_at_once(
    serve: Serve, failing_model_store: Path
) -> None:
    """Blue breaks the model for good (it then fails even on the warm-up pair): the worker stops, the pairs in
    its batch and those waiting in the other queue get 503 at once, /readyz turns 503, and so does every new
    request. (Served in a thread here, the process cannot exit; test_lifecycle checks that it does.)"""
    timeout_s = 60
    # A long MAX_BATCH_WAIT_MS: of two partial batches, the one queued first runs first.
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, max_batch_size=8,
               max_batch_wait_ms=60_000, request_timeout_s=timeout_s) as url, _client(url) as client, \
            ThreadPoolExecutor(5) as pool:
        assert client.get("/readyz").status_code == 200
        refused_before = metric_value(client, "siamcam_rejections_total", reason="worker_stopped")
        with model_kept_busy(client) as still_busy:
            started = time.monotonic()
            in_batch = [pool.submit(client.post, "/similarity", files=pair_files(*pair))
                        for pair in ((GOOD1, BLUE), (GOOD1, GOOD2), (GOOD2, GOOD1))]
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == len(in_batch))
            # Queued after them, so their batch comes second: still waiting when the worker stops.
            queued = [pool.submit(client.post, "/explain", files=pair_files(GOOD1, GOOD2)) for _ in range(2)]
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="explain") == len(queued))
            assert still_busy(), "the busy batch ended before the pairs queued"
        for future in [*in_batch, *queued]:
            _problem(future.result(), 503, "service-unavailable")
        assert time.monotonic() - started < 10 < timeout_s  # not a 504 after REQUEST_TIMEOUT_S
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json() == {"status": "failed"}
        late = client.post("/similarity", files=pair_files(GOOD1, GOOD2))
        assert "worker has stopped" in _problem(late, 503, "service-unavailable")["detail"]
        assert late.headers["Retry-After"]
        refused = len(in_batch) + len(queued) + 1
        assert metric_value(client, "siamcam_rejections_total", reason="worker_stopped") == refused_before + refused
