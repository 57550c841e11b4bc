"""ASGI middleware: request ids, logs and metrics for every request; admission and body limits for inference."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import Problem, internal_error, service_unavailable
from app.logs import request_id
from app.security import KEY_ID_SCOPE
from app.shutdown import Drain

logger = logging.getLogger("app.requests")
REQUEST_ID_HEADER = "X-Request-ID"
# A client's own id is echoed only when it is safe to put in a header and a log line.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# What a body over the limit should hold instead, for the paths that take more than two images.
BODY_IMAGES = {"/embed": "at most MAX_EMBED_IMAGES images", "/rank": "a query and at most MAX_RANK_CANDIDATES images"}


class RequestContextMiddleware:
    """Gives each request an id (the client's X-Request-ID, or a new one), returns it, logs and counts it.

    It also answers unexpected errors (500, problem+json), logged with the request's id. It must, rather than an
    `Exception` handler: Starlette runs that one in its ServerErrorMiddleware, outside this one (no id in the
    log or the answer), and re-raises after answering, so that uvicorn then drops the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        current_id = offered if _CLIENT_REQUEST_ID.match(offered) else uuid.uuid4().hex
        token = request_id.set(current_id)
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering
        answering = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = current_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unexpected error", extra={"method": scope["method"], "path": scope["path"]})
            if answering:
                raise  # the answer is half sent: only closing the connection tells the client
            await internal_error(current_id).response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            # The route's template, never the raw path: unknown paths must not create new series.
            route = getattr(scope.get("route"), "path", "other")
            metrics.REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(route).observe(elapsed)
            logger.info("request", extra={
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(elapsed * 1000, 2), "key_id": scope.get(KEY_ID_SCOPE),
            })
            request_id.reset(token)


class AdmissionMiddleware:
    """For inference requests: 503 while draining, 413 for bodies over the limit (read as it streams in),
    and every admitted request counted, so that a drain can wait for it."""

    def __init__(
        self, app: ASGIApp, drain: Drain, max_body_bytes: Mapping[str, int], retry_after_s: int
    ) -> None:
        """`max_body_bytes`: each inference path and the largest body it takes."""
        self.app = app
        self.drain = drain
        self.max_body_bytes = dict(max_body_bytes)
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.max_body_bytes:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes[scope["path"]]
        if self.drain.draining:
            metrics.REJECTIONS.labels("draining").inc()
            refusal = service_unavailable(
                "This replica is shutting down; retry, another one will answer.", self.retry_after_s
            )
            await refusal.response()(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope["path"]).response()(scope, receive, send)
            return
        with self.drain.track(scope["path"]):
            await self.app(scope, self._limited(receive, scope["path"]), send)

    def _limited(self, receive: Receive, path: str) -> Receive:
        """`receive`, failing with 413 as soon as the body grows past the path's limit (chunked uploads)."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes[path]:
                    raise self._too_large(path)
            return message

        return limited_receive

    def _too_large(self, path: str) -> Problem:
        images = BODY_IMAGES.get(path, "two images")
        return Problem(413, "content-too-large", f"The request body is over {self.max_body_bytes[path]:,} bytes; "
                       f"send {images} of at most MAX_UPLOAD_BYTES each.")
