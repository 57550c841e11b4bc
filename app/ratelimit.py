"""Rate limits per caller (API key, or client address when keys are off), counted by the `limits` library in
one store that every replica shares.

Each caller may make RATE_LIMIT_BURST requests in any window of RATE_LIMIT_BURST / RATE_LIMIT_PER_S seconds
(a moving window, whole seconds, at least one); beyond that it gets 429 with `Retry-After`. The counts live in
RATE_LIMIT_STORAGE: `memory://` (this process alone) or `redis://...`, where every replica and every front
process draws from the same counts, so that the configured rate is the deployment's whatever the number of
replicas. Every limited answer carries the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers:
`RateLimit-Policy: "default";q=<burst>;w=<window seconds>` and
`RateLimit: "default";r=<remaining>;t=<seconds until one more request is allowed>`), so that clients can pace
themselves.

When the store cannot be reached the service keeps serving, without limits (and without the RateLimit
fields): a rate limiter must not take the service down with it. Each failure counts in
`siamcam_rate_limit_store_errors_total` and one warning a minute is logged; the store is tried again after
STORE_RETRY_S, and the limits hold again as soon as it answers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from limits import RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import Problem
from app.security import KEY_ID_SCOPE
from app.settings import MEMORY_SCHEMES

logger = logging.getLogger(__name__)
POLICY_NAME = "default"
# A store that answers at all answers within milliseconds (bench/RESULTS.md, "Rate limits in Redis"); one that
# does not must not hold requests up for long. No retries: the request goes on
# unlimited instead, and the next request tries again.
STORE_TIMEOUT_S = 0.25
# After a failure, requests skip the store this long: a store that hangs costs its timeout once a second, not
# once a request. It is also the longest the limits stay off once the store is back.
STORE_RETRY_S = 1.0
WARNING_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int  # requests the caller may still make in the current window
    reset_s: int  # seconds until the oldest request counted leaves the window, i.e. one more is allowed


class Limits(Protocol):
    """What RateLimitMiddleware asks of a rate limiter: this module's, or app/owner_client.py's for the front
    processes of a container that counts in memory."""

    burst: int
    window_s: int

    async def take(self, caller: str) -> Decision | None:
        """Count one request of `caller`; None when it goes unlimited (the store failed)."""


class RateLimiter:
    """`burst` requests per caller in any `window_s` seconds, counted in the store at `storage_uri`; see the
    module docstring for what happens when the store fails."""

    def __init__(self, burst: int, window_s: int, storage_uri: str) -> None:
        self.burst = burst
        self.window_s = window_s
        self.storage_uri = storage_uri
        self._limit = RateLimitItemPerSecond(burst, window_s)
        self._strategy = MovingWindowRateLimiter(_storage(storage_uri))
        self._store_retry_at = -math.inf
        self._last_warning_at = -math.inf
        self._unlimited = 0  # requests let through unlimited since the store last answered

    async def take(self, caller: str) -> Decision | None:
        """Count one request of `caller`; None when the store failed (the request then goes unlimited)."""
        now = time.monotonic()
        if now < self._store_retry_at:
            self._unlimited += 1
            return None
        try:
            allowed = await self._strategy.hit(self._limit, caller)
            stats = await self._strategy.get_window_stats(self._limit, caller)
        except StorageError as error:
            self._store_failed(error, now)
            return None
        if self._unlimited:
            logger.info(f"the rate-limit store {_safe(self.storage_uri)} answers again: the limits hold again "
                        f"({self._unlimited} requests went unlimited while it failed)")
            self._unlimited = 0
        reset_s = max(1, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed=allowed, remaining=stats.remaining, reset_s=reset_s)

    def _store_failed(self, error: StorageError, now: float) -> None:
        metrics.RATE_LIMIT_STORE_ERRORS.inc()
        self._store_retry_at = now + STORE_RETRY_S
        self._unlimited += 1
        if now - self._last_warning_at >= WARNING_INTERVAL_S:
            self._last_warning_at = now
            cause = f"{type(error.storage_error).__name__}: {error.storage_error}"
            logger.warning(f"the rate-limit store {_safe(self.storage_uri)} failed ({cause}): serving without rate "
                           "limits until it answers again; check that it runs and that RATE_LIMIT_STORAGE points at "
                           "it (this warning repeats at most once a minute)")


def _storage(uri: str) -> Storage:
    """The `limits` async storage for a RATE_LIMIT_STORAGE uri (settings.py has checked its scheme)."""
    if urlsplit(uri).scheme in MEMORY_SCHEMES:
        return storage_from_string(f"async+{uri}")
    return storage_from_string(
        f"async+{uri}", implementation="redispy", wrap_exceptions=True,
        socket_timeout=STORE_TIMEOUT_S, socket_connect_timeout=STORE_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
    )


def _safe(uri: str) -> str:
    """The uri without its password, for the logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class RateLimitMiddleware:
    """Limits the requests to `paths` per caller; 429 problem+json when a caller is over its limit."""

    def __init__(self, app: ASGIApp, limiter: Limits, paths: tuple[str, ...]) -> None:
        self.app = app
        self.limiter = limiter
        self.paths = paths
        self.policy = f'"{POLICY_NAME}";q={limiter.burst};w={limiter.window_s}'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.take(_caller(scope))
        if decision is None:
            await self.app(scope, receive, send)
            return
        fields = {
            "RateLimit-Policy": self.policy,
            "RateLimit": f'"{POLICY_NAME}";r={decision.remaining};t={decision.reset_s}',
        }
        if not decision.allowed:
            refusal = Problem(429, "too-many-requests",
                              f"Over the limit of {self.limiter.burst} requests in "
                              f"{self.limiter.window_s} s: retry after {decision.reset_s} s, and pace requests "
                              "by the RateLimit header.",
                              {**fields, "Retry-After": str(decision.reset_s)})
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
