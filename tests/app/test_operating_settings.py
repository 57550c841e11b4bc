"""What the README promises about operating the service, each through `uvicorn app.main:app` in a process of its
own (tests/support/service.py), as a user or an orchestrator runs it: the drain after SIGTERM when its grace runs
out and on a second signal, a 504 for /explain while its overlays are rendered, and the settings MAX_OVERLAY_SIDE,
LOG_LEVEL, RETRY_AFTER_S, ADMISSION_WAIT_S, IMAGE_WORKERS and uvicorn's FORWARDED_ALLOW_IPS."""

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
from tests.conftest import DrawnPair
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
