"""What counting rate limits in Redis adds to a request, against counting them in memory (issue 26).

Run from the repository root: `.venv/bin/python -m bench.rate_limit_bench` (needs redis-server: `make
system-deps`). It starts three `uvicorn app.main:app` replicas of the bundled model as a user would, one thread
each: without rate limits, with RATE_LIMIT_STORAGE=memory://, and with a redis-server of its own on loopback
(limits high enough never to refuse). One client then sends the same request to each in turn (interleaved, in
a shuffled order each round, so that the machine's noise falls on all three alike) and prints each one's p50
and p90 latency, for GET /model (the cheapest limited request: the limiter's cost stands out) and POST
/similarity with a flowers pair (what users send). Then, in its own process, the limiter's time per request
with each store (what the middleware awaits) and the floor under it with Redis: the two round trips a limited
request makes (the moving window's hit and its statistics), made by `limits` with a bare client. Target: p50
at most 1 ms more with Redis than with memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import httpx
from limits import RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from app.ratelimit import RateLimiter
from deploy.load import make_pairs
from deploy.local_cluster import RedisServer, ensure_redis_server
from deploy.nginx_config import REPO_ROOT
from tests.support.service import running_service

TARGET_ADDED_MS = 1.0
# High enough that the bench never meets the limit: what is measured is the counting, not refusals.
NEVER_REFUSED_BURST = 100000
NEVER_REFUSED = {"RATE_LIMIT_PER_S": str(NEVER_REFUSED_BURST), "RATE_LIMIT_BURST": str(NEVER_REFUSED_BURST)}


def percentile_ms(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def interleaved(urls: dict[str, str], send: str, requests: int) -> dict[str, list[float]]:
    pair = make_pairs(1)[0]
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.Client(base_url=url, trust_env=False, timeout=60) for name, url in urls.items()}
    with ExitStack() as stack:
        for client in clients.values():
            stack.enter_context(client)
        order = list(clients)
        for index in range(requests + 20):  # the first 20 of each warm up connections and code paths
            rng.shuffle(order)  # no replica always goes first, or always right after another
            for name in order:
                client = clients[name]
                started = time.perf_counter()
                response = client.get("/model") if send == "/model" else client.post(send, files=pair.files())
                elapsed = time.perf_counter() - started
                assert response.status_code == 200, (name, response.status_code, response.text[:200])
                if index >= 20:
                    times[name].append(elapsed)
    return times


async def timed(step: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    times = []
    for index in range(requests + 20):
        started = time.perf_counter()
        await step()
        if index >= 20:
            times.append(time.perf_counter() - started)
    return times


async def in_process(url: str, requests: int) -> dict[str, list[float]]:
    """The limiter's own time per request (app/ratelimit.py's `take`, as the middleware calls it) with each store,
    and the floor under Redis's: the same two round trips (the moving window's hit, then its statistics) made
    by `limits` with a bare client."""
    limit = RateLimitItemPerSecond(NEVER_REFUSED_BURST, 1)
    strategy = MovingWindowRateLimiter(storage_from_string(f"async+{url}", implementation="redispy"))

    async def round_trips() -> None:
        await strategy.hit(limit, "bench")
        await strategy.get_window_stats(limit, "bench")

    times = {f"take(), {name}": await timed(partial(RateLimiter(NEVER_REFUSED_BURST, 1, uri).take, "key:bench"),
                                           requests)
             for name, uri in (("memory", "memory://"), ("redis", url))}
    times["floor: 2 round trips to Redis"] = await timed(round_trips, requests)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="GET /model requests to each replica")
    parser.add_argument("--pairs", type=int, default=200, help="POST /similarity requests to each replica")
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--model-name", default="flowers")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    workdir = Path(tempfile.mkdtemp(prefix="siamcam-rate-bench-"))
    base = {"MODEL_STORE": str(args.model_store.resolve()), "MODEL_NAME": args.model_name, "DEVICE": "cpu",
            "OMP_NUM_THREADS": "1"}
    with RedisServer(ensure_redis_server(), workdir) as redis, ExitStack() as stack:
        settings = {
            "none": {},
            "memory": {**NEVER_REFUSED, "RATE_LIMIT_STORAGE": "memory://"},
            "redis": {**NEVER_REFUSED, "RATE_LIMIT_STORAGE": redis.url},
        }
        urls = {name: stack.enter_context(running_service({**base, **env}, workdir / f"{name}.log")).url
                for name, env in settings.items()}
        print(f"1 client, requests interleaved over 3 replicas (1 torch thread each), model {args.model_name}")
        for send, count in (("/model", args.requests), ("/similarity", args.pairs)):
            times = interleaved(urls, send, count)
            figures = "; ".join(f"{name} p50 {percentile_ms(values, 0.5):.2f} ms p90 {percentile_ms(values, 0.9):.2f}"
                                for name, values in times.items())
            added = percentile_ms(times["redis"], 0.5) - percentile_ms(times["memory"], 0.5)
            memory_added = percentile_ms(times["memory"], 0.5) - percentile_ms(times["none"], 0.5)
            print(f"{send} x {count}: {figures}")
            print(f"  p50 added by Redis over memory: {added:+.2f} ms (target <= {TARGET_ADDED_MS:g} ms: "
                  f"{'met' if added <= TARGET_ADDED_MS else 'MISSED'}); by memory over no limits: "
                  f"{memory_added:+.2f} ms")
        for name, values in asyncio.run(in_process(redis.url, args.requests)).items():
            print(f"in this process, {name} x {args.requests}: p50 {percentile_ms(values, 0.5):.3f} ms "
                  f"p90 {percentile_ms(values, 0.9):.3f} ms")


if __name__ == "__main__":
    main()
