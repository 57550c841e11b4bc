"""Keeping the failing test model (tests/app/failing_model.py) busy on one /explain pair, so that a test can
queue pairs behind a batch that is surely running."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx

from tests.app.failing_model import YELLOW
from tests.support.images import pair_files
from tests.support.metrics import metric_value
from tests.support.waiting import wait_for


@contextmanager
def model_kept_busy(client: httpx.Client) -> Iterator[Callable[[], bool]]:
    """Inside, the model runs a one-pair /explain batch that takes it a second or more; yields a check that it
    still does (a test asserts it, to be sure that its pairs queued behind that batch). On leaving, waits for the
    busy request's answer, which is a 200 unless REQUEST_TIMEOUT_S is shorter than the batch."""
    started_before = metric_value(client, "siamcam_batch_size_count", queue="explain")
    ended_before = metric_value(client, "siamcam_inference_seconds_count", queue="explain")
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.post, "/explain", files=pair_files(YELLOW, YELLOW))
        wait_for(lambda: metric_value(client, "siamcam_batch_size_count", queue="explain") == started_before + 1)
        yield lambda: metric_value(client, "siamcam_inference_seconds_count", queue="explain") == ended_before
        assert busy.result().status_code in (200, 504)
