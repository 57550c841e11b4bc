"""Security headers on every answer, and the browser's cross-origin rules (CORS)."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The page loads only its own files; overlays are data: URLs and the previews of chosen files blob: URLs.
# Nothing inline (app/static has no inline script or style), nothing external, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# The model report (training/report.py) is one file with its style sheet inline and its figures as data: URLs, and
# no script: it may use exactly that.
REPORT_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# fastapi-offline's Swagger UI and ReDoc pages start themselves with inline scripts: they get no CSP (their
# other headers still apply). Everything they load comes from this service (/static-offline-docs).
WITHOUT_CSP = ("/docs", "/docs/oauth2-redirect", "/redoc")
ALWAYS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# What a page on an allowed origin may send and read (the RateLimit fields: draft-ietf-httpapi-ratelimit-headers).
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "X-Request-ID"]
CORS_EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "RateLimit", "RateLimit-Policy", "WWW-Authenticate"]
CORS_MAX_AGE_S = 600


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP answer, errors and 404s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fields = dict(ALWAYS)  # set only where the answer has none of its own (the model report's CSP)
        if scope["path"] not in WITHOUT_CSP:
            fields["Content-Security-Policy"] = CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in fields.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cors_options(origins: list[str]) -> dict[str, object]:
    """Starlette CORSMiddleware's options for `origins`; with none, no page of another origin may call the API."""
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST"],
        "allow_headers": CORS_REQUEST_HEADERS,
        "expose_headers": CORS_EXPOSED_HEADERS,
        "max_age": CORS_MAX_AGE_S,
    }
