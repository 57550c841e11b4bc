"""What the README promises about operating the service, through `uvicorn app.main:app` in a process of its own
(tests/support/service.py), as a user or an orchestrator runs it: the drain after SIGTERM when its grace runs
out and on a second signal, a 504 for /explain while its overlays are rendered, a 400 for a body that is not
multipart, and the settings MAX_OVERLAY_SIDE, LOG_LEVEL, RETRY_AFTER_S, ADMISSION_WAIT_S and uvicorn's
FORWARDED_ALLOW_IPS; IMAGE_WORKERS with uvicorn in this process, where the service's threads can be seen."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.settings import Settings
from deploy.local_cluster import Replica
from tests.app.conftest import TEST_MODEL_NAME
from tests.app.failing_model import FAILING_MODEL_NAME, YELLOW
from tests.support.images import class_image, encode, pair_files
from tests.support.metrics import metric_value
from tests.support.service import running_service, serve_in_thread
from tests.support.waiting import wait_for

RETRY_AFTER_S = 7  # not the default 1: a 503 must carry the setting


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, trust_env=False)


def _log_lines(replica: Replica) -> list[dict]:
    return [json.loads(line) for line in replica.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def busy_replica(failing_model_store: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Replica]:
    """The failing test model (an all-yellow pair keeps it busy about a second) one pair at a time, draining for
    `request.param` seconds after a signal."""
    env = {"MODEL_STORE": str(failing_model_store), "MODEL_NAME": FAILING_MODEL_NAME, "MAX_BATCH_SIZE": "1",
           "DRAIN_GRACE_S": str(request.param), "RETRY_AFTER_S": str(RETRY_AFTER_S)}
    with running_service(env, tmp_path / "uvicorn.log") as replica:
        yield replica


def _queue_busy_pairs(client: httpx.Client, pool: ThreadPoolExecutor, count: int) -> list:
    """`count` all-yellow /similarity requests, each about a second of the model's time, until all are admitted
    (one running, the others queued)."""
    answers = [pool.submit(client.post, "/similarity", files=pair_files(YELLOW, YELLOW)) for _ in range(count)]
    wait_for(lambda: metric_value(client, "siamcam_inference_requests_in_progress", route="/similarity") == count)
    return answers


@pytest.mark.parametrize("busy_replica", [1], indirect=True)
def test_a_drain_whose_grace_runs_out_leaves_and_says_so(busy_replica: Replica) -> None:
    """Catches a drain that waits past DRAIN_GRACE_S (the orchestrator would SIGKILL the replica mid-request), a
    /readyz that does not say `draining`, and a late request refused without the configured Retry-After."""
    with _client(busy_replica.url) as client, ThreadPoolExecutor(6) as pool:
        answers = _queue_busy_pairs(client, pool, 6)  # about 6 s of work, against a grace of 1 s
        signalled = time.monotonic()
        busy_replica.process.send_signal(signal.SIGTERM)
        wait_for(lambda: client.get("/readyz").status_code == 503, 5)
        assert client.get("/readyz").json() == {"status": "draining"}
        late = client.post("/similarity", files=pair_files(YELLOW, YELLOW))
        assert late.status_code == 503 and late.headers["retry-after"] == str(RETRY_AFTER_S)
        exit_code = busy_replica.process.wait(timeout=30)
        took_s = time.monotonic() - signalled
        answered = [answer.result() for answer in answers]
    # It left soon after the grace period (the batch running then, about a second, is let finish), not after the
    # queued work (about 6 s) or the requests' timeouts (30 s); each request still waiting got a 503 to retry.
    assert exit_code in (0, -signal.SIGTERM) and took_s < 1 + 4, took_s
    statuses = [answer.status_code for answer in answered]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert all(answer.headers["retry-after"] == str(RETRY_AFTER_S) for answer in answered
               if answer.status_code == 503)
    warnings = [line for line in _log_lines(busy_replica) if line["level"] == "WARNING"]
    assert any(line["message"] == "grace period over with requests unanswered" for line in warnings), warnings


@pytest.mark.parametrize("busy_replica", [60], indirect=True)
def test_a_second_signal_stops_the_drain(busy_replica: Replica) -> None:
    """Catches a second SIGTERM (or Ctrl-C) that is ignored while a long drain goes on: it must stop waiting."""
    with _client(busy_replica.url) as client, ThreadPoolExecutor(6) as pool:
        answers = _queue_busy_pairs(client, pool, 6)
        busy_replica.process.send_signal(signal.SIGTERM)
        wait_for(lambda: client.get("/readyz").status_code == 503, 5)
        second = time.monotonic()
        busy_replica.process.send_signal(signal.SIGINT)
        exit_code = busy_replica.process.wait(timeout=30)
        took_s = time.monotonic() - second
        statuses = [answer.result().status_code for answer in answers]
    assert took_s < 5, took_s  # not the 60 s of grace, nor the 6 s of queued work
    assert exit_code in (0, -signal.SIGTERM, -signal.SIGINT), exit_code
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses  # those still waiting: retry elsewhere


LARGE_SIDE = 3000  # px: two such pictures fill the decode budget of `tuned_replica`
# Blocks of flat colour: 9 Mpx in a small file.
LARGE_PNG = encode(class_image("green", 7, (60, 60)).resize((LARGE_SIDE, LARGE_SIDE), Image.Resampling.NEAREST), "PNG")


@pytest.fixture(scope="module")
def tuned_replica(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """The suite's small model with non-default settings: overlays capped at 100 px, warnings only in the log,
    room to decode one pair of LARGE_SIDE pictures at a time and a long wait for it."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "MAX_OVERLAY_SIDE": "100",
           "LOG_LEVEL": "WARNING", "MAX_DECODE_PIXELS_IN_FLIGHT": str(2 * LARGE_SIDE**2), "ADMISSION_WAIT_S": "60"}
    with running_service(env, tmp_path_factory.mktemp("tuned") / "uvicorn.log") as replica:
        yield replica


def test_max_overlay_side_caps_what_a_request_asks(tuned_replica: Replica) -> None:
    """Catches a MAX_OVERLAY_SIDE that is not applied, to the default max_side (1024) or to a larger request,
    or that enlarges what a smaller max_side asks for."""
    files = pair_files(encode(class_image("red", 1, (300, 200)), "PNG"), encode(class_image("red", 2, (120, 240))))
    with _client(tuned_replica.url) as client:
        for form, sizes in (({}, [(100, 67), (50, 100)]), ({"max_side": "150"}, [(100, 67), (50, 100)]),
                            ({"max_side": "60"}, [(60, 40), (30, 60)])):
            answer = client.post("/explain", files=files, data=form)
            assert answer.status_code == 200, answer.text
            for overlay, size in zip((answer.json()["explanations"]["factual"][key] for key in ("image1", "image2")),
                                     sizes, strict=True):
                assert (overlay["width"], overlay["height"]) == size, form


def test_log_level_warning_keeps_the_info_lines_out(tuned_replica: Replica) -> None:
    """Catches a LOG_LEVEL that is not applied: with WARNING, a served request writes no INFO line (the request
    log), while a warning (the multipart parser's, on a broken body) is still written."""
    with _client(tuned_replica.url) as client:
        assert client.post("/similarity", files=pair_files(LARGE_PNG, LARGE_PNG)).status_code == 200
        broken = client.post("/similarity", content=b"garbage",
                             headers={"content-type": "multipart/form-data; boundary=abc"})
        assert broken.status_code == 400
    wait_for(lambda: any(line["level"] == "WARNING" for line in _log_lines(tuned_replica)))
    levels = {line["level"] for line in _log_lines(tuned_replica)}
    assert levels <= {"WARNING", "ERROR", "CRITICAL"}, levels


@pytest.mark.parametrize(("headers", "body"), [({"content-type": "application/json"}, b'{"image1": "a.jpg"}'),
                                               ({"content-type": "application/x-www-form-urlencoded"}, b"image1=a"),
                                               ({}, b""),
                                               ({"content-type": "multipart/form-data; boundary=abc"}, b"garbage")],
                         ids=["json", "urlencoded", "no body", "broken multipart"])
def test_a_body_that_is_not_multipart_gets_400_saying_what_to_send(tuned_replica: Replica, headers: dict[str, str],
                                                                   body: bytes) -> None:
    """Catches a JSON or urlencoded body answered 422 "Field required" (as it was), which does not say that the
    images go in a multipart form, and a service that stops serving after one."""
    with _client(tuned_replica.url) as client:
        for path in ("/similarity", "/explain"):
            answer = client.post(path, content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"] == "urn:siamcam:problem:bad-request"
            assert "multipart" in answer.json()["detail"]
        assert client.get("/readyz").status_code == 200


def test_admission_waits_for_room_in_the_decode_budget_then_admits(tuned_replica: Replica) -> None:
    """Catches an ADMISSION_WAIT_S that is not applied (the default 1 s, or none): with room to decode one pair
    at a time, concurrent pairs of 9 Mpx pictures wait their turn and are all answered, none refused. (With no
    wait, such a flood is refused in part: tests/app/test_admission.py.)"""
    async def post_all(count: int) -> list[int]:
        async with httpx.AsyncClient(base_url=tuned_replica.url, timeout=120, trust_env=False) as client:
            answers = await asyncio.gather(*(client.post("/similarity", files=pair_files(LARGE_PNG, LARGE_PNG))
                                             for _ in range(count)))
        return [answer.status_code for answer in answers]

    with _client(tuned_replica.url) as client:
        refused_before = metric_value(client, "siamcam_rejections_total", reason="decode_budget")
        started = time.monotonic()
        assert asyncio.run(post_all(6)) == [200] * 6
        took_s = time.monotonic() - started
        assert metric_value(client, "siamcam_rejections_total", reason="decode_budget") == refused_before
        assert metric_value(client, "siamcam_decode_pixels_in_flight") == 0
    print(f"6 pairs one at a time: {took_s:.1f} s")


# px: four PNG overlays of 27 Mpx rendered one at a time (IMAGE_WORKERS=1) take seconds; the model, milliseconds.
# (Four of 12 Mpx on two threads took 1.4 s on a quiet 2-core machine: too close to a timeout to tell.)
RENDER_SIDE = 6000
RENDER_TIMEOUT_S = 1


def test_explain_times_out_with_504_while_its_overlays_are_rendered(model_store: Path, tmp_path: Path) -> None:
    """Catches a REQUEST_TIMEOUT_S that stops counting once the batch has run: the overlays are part of the
    answer. The pair's batch ends well within the timeout (it is counted in /metrics when the 504 comes), so
    the time ran out while its overlays were being rendered."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "REQUEST_TIMEOUT_S": str(RENDER_TIMEOUT_S),
           "MAX_OVERLAY_SIDE": str(RENDER_SIDE), "IMAGE_WORKERS": "1"}
    photo = encode(class_image("red", 3, (60, 45)).resize((RENDER_SIDE, RENDER_SIDE * 3 // 4),
                                                          Image.Resampling.BICUBIC), "JPEG", quality=90)
    with running_service(env, tmp_path / "uvicorn.log") as replica, _client(replica.url) as client:
        batches_before = metric_value(client, "siamcam_inference_seconds_count", queue="explain")
        started = time.monotonic()
        answer = client.post("/explain", files=pair_files(photo, photo),
                             data={"format": "png", "max_side": str(RENDER_SIDE)})
        took_s = time.monotonic() - started
        assert metric_value(client, "siamcam_inference_seconds_count", queue="explain") == batches_before + 1
        assert answer.status_code == 504, answer.text
        assert answer.json()["type"] == "urn:siamcam:problem:timeout", answer.text
        assert RENDER_TIMEOUT_S <= took_s < RENDER_TIMEOUT_S + 2, took_s
        # The service keeps serving once the abandoned overlays are done.
        wait_for(lambda: client.post("/similarity", files=pair_files(photo, photo)).status_code == 200, 60)


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(model_store: Path, tmp_path: Path) -> None:
    """Catches a client address taken from any peer's X-Forwarded-For: with FORWARDED_ALLOW_IPS naming another
    address than this loopback peer, a client cannot dodge its rate limit by claiming another address in the
    header. Both requests are counted against the peer's own address."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "FORWARDED_ALLOW_IPS": "192.0.2.1",
           "RATE_LIMIT_PER_S": "0.01", "RATE_LIMIT_BURST": "1"}
    with running_service(env, tmp_path / "uvicorn.log") as replica, _client(replica.url) as client:
        first = client.get("/model", headers={"X-Forwarded-For": "198.51.100.1"})
        second = client.get("/model", headers={"X-Forwarded-For": "198.51.100.2"})
    assert first.status_code == 200, first.text
    assert second.status_code == 429, "a forwarded address from an untrusted peer was believed"


def test_image_workers_sets_the_threads_that_decode_and_render(model_store: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an IMAGE_WORKERS that is not applied (the pool sized by the CPUs instead, or asyncio's default
    pool used): under a burst of /explain requests, exactly IMAGE_WORKERS new image threads run them. The
    service runs in this process (uvicorn in a thread), where its threads can be seen by name."""
    workers = 5  # not this machine's CPU count, the default
    monkeypatch.setenv("IMAGE_WORKERS", str(workers))
    monkeypatch.setenv("MODEL_STORE", str(model_store))
    monkeypatch.setenv("MODEL_NAME", TEST_MODEL_NAME)
    settings = Settings()
    assert settings.image_workers == workers
    before = {thread.ident for thread in threading.enumerate()}
    files = pair_files(encode(class_image("red", 5, (640, 480)), "PNG"), encode(class_image("blue", 6, (480, 640))))

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
            answers = await asyncio.gather(*(client.post("/explain", files=files) for _ in range(8)))
        return [answer.status_code for answer in answers]

    with serve_in_thread(settings) as url:
        assert asyncio.run(burst(url)) == [200] * 8
        image_threads = [thread for thread in threading.enumerate()
                         if thread.ident not in before and thread.name.startswith("images")]
    assert len(image_threads) == workers, [thread.name for thread in image_threads]
