"""Rate limits per caller: a token bucket per API key (or per client address when keys are off).

Each caller may make RATE_LIMIT_BURST requests at once and RATE_LIMIT_PER_S a second on average; beyond that
it gets 429 with `Retry-After`. Every limited answer carries the IETF RateLimit fields
(draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy: "default";q=<burst>;w=<refill seconds>` and
`RateLimit: "default";r=<remaining>;t=<seconds until full>`), so that clients can pace themselves.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problem
from app.security import KEY_ID_SCOPE

POLICY_NAME = "default"


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int  # whole requests the caller may still make at once
    full_in_s: int  # seconds until the bucket is full again
    retry_after_s: int  # when refused: seconds until one request is allowed again


class TokenBuckets:
    """One bucket per caller, at most `max_callers` of them.

    A bucket that has refilled completely is the same as no bucket, so idle callers are forgotten as soon as
    theirs is full; past `max_callers` the least recently seen caller is forgotten even earlier (it then
    starts again with a full bucket). Memory is bounded either way. Runs on the event loop: no locking.
    """

    def __init__(self, rate_per_s: float, burst: int, max_callers: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_callers = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first

    @property
    def refill_s(self) -> float:
        return self.burst / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> Decision:
        now = self._clock()
        bucket = self._buckets.pop(caller, None)
        tokens = self.burst if bucket is None else min(
            self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[caller] = _Bucket(tokens, now)
        self._forget_idle(now)
        return Decision(
            allowed=allowed,
            remaining=math.floor(tokens),
            full_in_s=math.ceil((self.burst - tokens) / self.rate_per_s),
            retry_after_s=0 if allowed else max(1, math.ceil((1 - tokens) / self.rate_per_s)),
        )

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self.refill_s and len(self._buckets) <= self.max_callers:
                return  # ordered by last use: if the oldest is still refilling, so are all the others
            self._buckets.popitem(last=False)


class RateLimitMiddleware:
    """Limits the requests to `paths` per caller; 429 problem+json when a caller is over its limit."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets, paths: tuple[str, ...]) -> None:
        self.app = app
        self.buckets = buckets
        self.paths = paths
        self.policy = f'"{POLICY_NAME}";q={buckets.burst};w={max(1, round(buckets.refill_s))}'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        decision = self.buckets.take(_caller(scope))
        fields = {
            "RateLimit-Policy": self.policy,
            "RateLimit": f'"{POLICY_NAME}";r={decision.remaining};t={decision.full_in_s}',
        }
        if not decision.allowed:
            refusal = Problem(429, "too-many-requests",
                              f"Over the limit of {self.buckets.rate_per_s:g} requests a second (bursts of "
                              f"{self.buckets.burst}): retry after {decision.retry_after_s} s, and pace requests "
                              "by the RateLimit header.",
                              {**fields, "Retry-After": str(decision.retry_after_s)})
            await refusal.response()(scope, receive, send)
            return

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in fields.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_fields)


def _caller(scope: Scope) -> str:
    """The API key's id when keys are on; else the client address uvicorn resolved (behind the balancer, from
    X-Forwarded-For, which uvicorn trusts only from FORWARDED_ALLOW_IPS)."""
    if (key_id := scope.get(KEY_ID_SCOPE)) is not None:
        return f"key:{key_id}"
    client = scope.get("client")
    return f"address:{client[0]}" if client else "address:unknown"
