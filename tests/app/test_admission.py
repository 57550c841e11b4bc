"""Admission before work, for real over HTTP: a budget of decoded pixels in flight refuses what it cannot take
with 503 and Retry-After at once, a pair larger than the whole budget gets 422, a full queue refuses before any
decoding, and every admitted pixel is given back, /explain's backgrounds included."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.admission import (
    BudgetExhausted, ImageWork, PixelBudget, SharedPixelBudget, forget_front_pixels, pixel_counters,
)
from tests.app.busy_model import model_kept_busy
from tests.app.failing_model import FAILING_MODEL_NAME
from tests.support.images import drawn_image, encode, pair_files
from tests.support.metrics import metric_value
from tests.support.waiting import wait_for

LARGE_SIDE = 3000  # 9 Mpx per image
# Blocks of flat colour: 9 Mpx in a file far below MAX_UPLOAD_BYTES.
LARGE_PNG = encode(drawn_image(7, (60, 60)).resize((LARGE_SIDE, LARGE_SIDE), Image.Resampling.NEAREST), "PNG")
SMALL_PNG = encode(drawn_image(8, (48, 48)), "PNG")
FLOOD = 12


async def _post_all(url: str, pairs: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
        return await asyncio.gather(*(client.post("/similarity", files=files) for files in pairs))


def test_a_flood_of_large_images_gets_200_or_503_and_the_service_stays_ready(
    serve: Callable[..., AbstractContextManager[str]]
) -> None:
    pair_pixels = 2 * LARGE_SIDE * LARGE_SIDE
    # Room for one large pair at a time, and no waiting: every request that arrives while a pair is being
    # decoded is refused.
    with serve(max_decode_pixels_in_flight=pair_pixels, admission_wait_s=0, max_batch_wait_ms=10,
               retry_after_s=4) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        refused_before = metric_value(client, "siamcam_rejections_total", reason="decode_budget")
        responses = asyncio.run(_post_all(url, [pair_files(LARGE_PNG, LARGE_PNG)] * FLOOD))
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses and 503 in statuses, statuses
        for refused in (response for response in responses if response.status_code == 503):
            assert refused.headers["retry-after"] == "4"  # RETRY_AFTER_S, not the default 1
            assert refused.headers["content-type"] == "application/problem+json"
            assert "decoding other images" in refused.json()["detail"]
        refusals = metric_value(client, "siamcam_rejections_total", reason="decode_budget") - refused_before
        assert refusals == statuses.count(503)
        assert metric_value(client, "siamcam_decode_pixels_in_flight") == 0
        assert client.get("/readyz").status_code == 200
        assert client.post("/similarity", files=pair_files(LARGE_PNG, LARGE_PNG)).status_code == 200


def test_a_pair_larger_than_the_whole_budget_gets_422(serve: Callable[..., AbstractContextManager[str]]) -> None:
    small_pixels = 2 * 48 * 48
    with serve(max_decode_pixels_in_flight=small_pixels) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        too_large = client.post("/similarity", files=pair_files(SMALL_PNG, encode(drawn_image(9, (64, 48)))))
        assert too_large.status_code == 422
        assert too_large.json()["type"] == "urn:siamcam:problem:images-too-large"
        assert f"{48 * 48 + 64 * 48:,} pixels" in too_large.json()["detail"]
        assert "MAX_DECODE_PIXELS_IN_FLIGHT" in too_large.json()["detail"]
        assert client.post("/similarity", files=pair_files(SMALL_PNG, SMALL_PNG)).status_code == 200


def test_a_full_queue_refuses_before_decoding(serve: Callable[..., AbstractContextManager[str]],
                                              failing_model_store: Path) -> None:
    huge_jpeg = encode(Image.new("RGB", (6000, 6000), (90, 140, 30)), "JPEG")  # 36 Mpx, a small file
    # The model is kept busy, so that the first pair stays queued while the second arrives.
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, queue_capacity=1,
               max_batch_size=8, retry_after_s=2) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client, ThreadPoolExecutor(1) as pool:
        with model_kept_busy(client) as still_busy:
            queued = pool.submit(client.post, "/similarity", files=pair_files(SMALL_PNG, SMALL_PNG))
            wait_for(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == 1)
            admitted_before = metric_value(client, "siamcam_decode_pixels_admitted_total")
            refused = client.post("/similarity", files=pair_files(huge_jpeg, huge_jpeg))
            assert still_busy(), "the first pair must still have been queued when the second was refused"
            assert metric_value(client, "siamcam_decode_pixels_admitted_total") == admitted_before
        assert queued.result().status_code == 200
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"  # RETRY_AFTER_S, not the default 1
        assert "at capacity" in refused.json()["detail"]


def test_explain_gives_its_pixels_back_once_its_backgrounds_are_decoded(
    serve: Callable[..., AbstractContextManager[str]]
) -> None:
    pair_pixels = 2 * LARGE_SIDE * LARGE_SIDE
    # Room for one pair: while /explain's backgrounds were still charged, the next pair would get 503.
    with serve(max_decode_pixels_in_flight=pair_pixels, admission_wait_s=5) as url, \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        admitted_before = metric_value(client, "siamcam_decode_pixels_admitted_total")
        for _ in range(3):
            explained = client.post("/explain", files=pair_files(LARGE_PNG, LARGE_PNG))
            assert explained.status_code == 200
            assert explained.json()["explanations"]["factual"]["image1"]["width"] == 1024
        assert metric_value(client, "siamcam_decode_pixels_admitted_total") == admitted_before + 3 * pair_pixels
        assert metric_value(client, "siamcam_decode_pixels_in_flight") == 0
        assert client.post("/similarity", files=pair_files(LARGE_PNG, LARGE_PNG)).status_code == 200


def test_memory_is_given_back_after_a_pause_not_between_the_requests_of_a_stream() -> None:
    given_back: list[str] = []

    async def stream_then_pause() -> tuple[int, int]:
        work = ImageWork(1, PixelBudget(10_000), idle_before_trim_s=0.3,
                         give_back=lambda: given_back.append(threading.current_thread().name))
        try:
            for _ in range(8):  # a request every 0.05 s: the decoder is never idle for 0.3 s
                await work.admit(100, 0)
                work.discharge(100)
                await asyncio.sleep(0.05)
            during_stream = len(given_back)
            await asyncio.sleep(0.6)
            return during_stream, len(given_back)
        finally:
            work.close()

    during_stream, after_pause = asyncio.run(stream_then_pause())
    assert during_stream == 0
    assert after_pause == 1
    assert given_back[0].startswith("images")  # on an image thread, never on the event loop


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_image_work_returns_every_result_in_order_and_raises_only_after_every_call_ended(workers: int) -> None:
    """Catches results returned in the order of the threads' shares rather than of the calls, a call lost from a
    share, and an error raised while other calls still decode pixels charged for them (run_all's promise)."""
    ended: list[int] = []

    def call(index: int, broken: int | None) -> int:
        if index == broken:
            raise ValueError(f"image {index} is broken")
        threading.Event().wait(0.02 if index % 2 else 0.0)  # the shares end in another order than the calls
        ended.append(index)
        return index * 10

    async def run(calls: int, broken: int | None = None) -> list[int]:
        work = ImageWork(workers, PixelBudget(10_000))
        try:
            return await work.run_all([lambda index=index: call(index, broken) for index in range(calls)])
        finally:
            work.close()

    assert asyncio.run(run(7)) == [0, 10, 20, 30, 40, 50, 60]
    assert asyncio.run(run(1)) == [0]
    ended.clear()
    with pytest.raises(ValueError, match="image 2"):
        asyncio.run(run(7, broken=2))
    assert sorted(ended) == [0, 1, 3, 4, 5, 6]


# A front process of a container holding pixels of the shared budget until told to let go (stdin closes).
_OTHER_FRONT = """
import asyncio, sys
from app.admission import SharedPixelBudget
async def hold():
    budget = SharedPixelBudget(int(sys.argv[1]), int(sys.argv[2]), index=1)
    await budget.acquire(int(sys.argv[3]), wait_s=0)
    print("held", flush=True)
    sys.stdin.read()
asyncio.run(hold())
"""


# A front process of a container holding the shared budget's lock (as while it takes pixels) until stdin closes.
_LOCKING_FRONT = """
import sys
from app.admission import SharedPixelBudget
budget = SharedPixelBudget(1_000, int(sys.argv[1]), index=1)
with budget.locked():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_front_takes_no_pixels_while_another_front_holds_the_lock() -> None:
    """Catches a lock that excludes nobody: fronts inherit one descriptor of the block, one open file description
    that flock would treat as one owner, so that two fronts could both see room for the last pixels and take them."""
    counters = pixel_counters(fronts=2)
    other = subprocess.Popen([sys.executable, "-c", _LOCKING_FRONT, str(counters)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, pass_fds=(counters,), text=True)
    budget = SharedPixelBudget(1_000, counters, index=0)
    taking = threading.Thread(target=asyncio.run, args=(budget.acquire(10, wait_s=30),))
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "locked"
        taking.start()
        taking.join(timeout=0.5)
        assert taking.is_alive(), "pixels were taken while another front held the lock"
        assert budget.in_use == 0
        other.stdin.close()  # type: ignore[union-attr]  # the other front lets go
        taking.join(timeout=10)
        assert not taking.is_alive() and budget.in_use == 10
    finally:
        other.kill()
        other.wait()
        taking.join(timeout=10)
        budget.close()
        os.close(counters)


def test_front_processes_share_one_budget_and_a_dead_fronts_pixels_come_back() -> None:
    """Catches fronts that each admit MAX_DECODE_PIXELS_IN_FLIGHT (N fronts would decode N times the pixels the
    setting bounds), and a budget that a killed front leaves charged for good."""
    capacity, held = 1_000, 700
    counters = pixel_counters(fronts=2)
    other = subprocess.Popen([sys.executable, "-c", _OTHER_FRONT, str(capacity), str(counters), str(held)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(counters,), text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"

        async def check() -> None:
            budget = SharedPixelBudget(capacity, counters, index=0)
            with pytest.raises(BudgetExhausted):
                await budget.acquire(capacity - held + 1, wait_s=0.05)
            await budget.acquire(capacity - held, wait_s=0)
            budget.release(capacity - held)
            other.kill()
            other.wait()
            forget_front_pixels(counters, index=1)  # what the main process does when a front dies
            await budget.acquire(capacity, wait_s=0)
            assert budget.in_use == capacity

        asyncio.run(check())
    finally:
        other.kill()
        os.close(counters)
