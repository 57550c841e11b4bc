"""Rate limits counted in a real Redis (RATE_LIMIT_STORAGE): one limit for every replica, and a store that fails
under load lets requests through without limits (never a 5xx), then limits again once it is back."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import httpx
import pytest

from deploy.local_cluster import RedisServer, free_port
from tests.support.metrics import metric_value

Serve = Callable[..., AbstractContextManager[str]]
KEY = "k3y-for-store-tests-0123456789"
OTHER_KEY = "another-k3y-for-store-tests-987"
STORE_ERRORS = "siamcam_rate_limit_store_errors_total"


def _http(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}, trust_env=False)


def _remaining(response: httpx.Response) -> int:
    match = re.fullmatch(r'"default";r=(\d+);t=(\d+)', response.headers["ratelimit"])
    assert match, response.headers["ratelimit"]
    return int(match.group(1))


@pytest.mark.parametrize("store", ["redis", "memory"])
def test_replicas_sharing_a_redis_store_share_each_keys_limit(
    serve: Serve, redis_server: RedisServer, store: str
) -> None:
    storage = redis_server.url if store == "redis" else "memory://"
    settings = {"api_keys": f"{KEY},{OTHER_KEY}", "rate_limit_per_s": 0.2, "rate_limit_burst": 4,
                "rate_limit_storage": storage}
    with ExitStack() as stack:
        first, second = (stack.enter_context(_http(stack.enter_context(serve(**settings)))) for _ in range(2))
        # The key's four requests spread over two replicas, as a balancer spreads them.
        answers = [replica.get("/model") for replica in (first, second, first, second)]
        assert [answer.status_code for answer in answers] == [200] * 4
        if store == "memory":
            # Each process counts alone: every replica grants the key its whole limit again.
            assert [_remaining(answer) for answer in answers] == [3, 3, 2, 2]
            assert first.get("/model").status_code == second.get("/model").status_code == 200
            return
        assert [_remaining(answer) for answer in answers] == [3, 2, 1, 0], "one count for both replicas"
        for replica in (first, second):
            refused = replica.get("/model")
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        # Another key has its own count, in the same store.
        other = second.get("/model", headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert other.status_code == 200 and _remaining(other) == 3


@dataclass(frozen=True)
class Answer:
    sent_at: float
    status: int | None  # None: no HTTP answer at all
    retry_after: str | None
    limited: bool  # carries the RateLimit fields


class Load:
    """Clients sending GET /model with the key, paced, from threads, until stopped; every answer recorded."""

    def __init__(self, url: str, clients: int = 3, pause_s: float = 0.02) -> None:
        self.url, self.clients, self.pause_s = url, clients, pause_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(clients)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            self._pool.submit(self._client)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    def _client(self) -> None:
        with _http(self.url) as http:
            while not self._stop.is_set():
                sent_at = time.monotonic()
                try:
                    response = http.get("/model")
                    answer = Answer(sent_at, response.status_code, response.headers.get("retry-after"),
                                    "ratelimit" in response.headers)
                except httpx.HTTPError:
                    answer = Answer(sent_at, None, None, False)
                self.answers.append(answer)
                time.sleep(self.pause_s)

    def since(self, moment: float) -> list[Answer]:
        return [answer for answer in self.answers if answer.sent_at >= moment]

    def between(self, start: float, end: float) -> list[Answer]:
        return [answer for answer in self.answers if start <= answer.sent_at < end]


def _store_log(captured: str) -> list[dict]:
    lines = [json.loads(line) for line in captured.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "app.ratelimit"]


def test_a_failed_store_lets_requests_through_and_the_limits_resume_when_it_is_back(
    serve: Serve, redis_server: RedisServer, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = {"api_keys": KEY, "rate_limit_per_s": 5, "rate_limit_burst": 5,
                "rate_limit_storage": redis_server.url}
    with serve(**settings) as url, httpx.Client(base_url=url, trust_env=False) as scraper:
        errors_before = metric_value(scraper, STORE_ERRORS)
        capfd.readouterr()
        with Load(url) as load:
            time.sleep(2.0)
            redis_server.stop()
            stopped_at = time.monotonic()
            time.sleep(3.0)
            restarting_at = time.monotonic()
            redis_server.start()
            started_at = time.monotonic()
            time.sleep(3.0)
        errors_after = metric_value(scraper, STORE_ERRORS)
    captured = capfd.readouterr().err

    answers = load.answers
    assert len(answers) > 100, "the load was light enough to be unlimited anyway"
    # Nothing but served or refused-with-Retry-After, whatever the store did.
    assert {answer.status for answer in answers} <= {200, 429}, {answer.status for answer in answers}
    assert all(answer.retry_after and int(answer.retry_after) >= 1 for answer in answers if answer.status == 429)
    # Store up: three clients at dozens of requests/s get the 5 a second they may make, the rest 429 (up to
    # the moment the store stops: a request sent just before may be answered after).
    before = load.between(stopped_at - 1.5, stopped_at - 0.1)
    assert sum(a.status == 429 for a in before) > len(before) / 2 and all(a.limited for a in before)
    # Store down (past the first request, which may have been counted just before): everything is served,
    # without the RateLimit fields, which the service cannot know.
    during = load.between(stopped_at + 0.1, restarting_at)
    assert during and all(a.status == 200 and not a.limited for a in during), \
        [(round(a.sent_at - stopped_at, 3), a.status, a.limited) for a in during if a.status != 200 or a.limited]
    # Store back: limited again within STORE_RETRY_S (1 s) and what a connection takes.
    after = load.since(started_at + 1.5)
    assert after and sum(a.status == 429 for a in after) > len(after) / 2 and all(a.limited for a in after)
    # Each failure is counted; the store is retried once a second (by the requests in flight at that moment: at
    # most one per client), so a 3 s outage is a few failures, not one a request.
    assert 1 <= errors_after - errors_before <= load.clients * 5 < len(during) / 4
    logged = _store_log(captured)
    warnings = [line for line in logged if line["level"] == "WARNING"]
    assert len(warnings) == 1, "one warning a minute"
    assert "serving without rate limits" in warnings[0]["message"] and str(redis_server.port) in warnings[0]["message"]
    assert any("answers again" in line["message"] for line in logged if line["level"] == "INFO")


def test_a_store_unreachable_from_the_start_leaves_the_api_serving_and_says_so_without_its_password(
    serve: Serve, capfd: pytest.CaptureFixture[str]
) -> None:
    password = "s3cret-store-password"
    storage = f"redis://:{password}@127.0.0.1:{free_port()}/0"  # nothing listens there
    with serve(api_keys=KEY, rate_limit_per_s=0.2, rate_limit_burst=1, rate_limit_storage=storage) as url, \
            _http(url) as http:
        errors_before = metric_value(http, STORE_ERRORS)
        answers = [http.get("/model") for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200] * 3, "over the limit, but nothing counts"
        assert all("ratelimit" not in answer.headers for answer in answers)
        assert metric_value(http, STORE_ERRORS) > errors_before
    logged = _store_log(capfd.readouterr().err)
    (warning,) = [line for line in logged if line["level"] == "WARNING"]
    assert "Connection refused" in warning["message"] and ":***@127.0.0.1" in warning["message"]
    assert password not in json.dumps(logged)
