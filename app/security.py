"""API keys and the metrics token: who may call what, checked before a request costs a byte of its body.

Keys are held as sha256 digests only and compared with `hmac.compare_digest`, so neither the comparison's
timing nor a memory dump gives a key away; a keys file may hold `id:sha256-hex` lines instead of keys, and
then holds no secret at all. Each key has an id (its own, or the first 8 hex digits of its sha256) that the
request log records in place of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Problem
from app.settings import Settings

# The endpoints that need a key when keys are configured; /healthz, /readyz, the page and /docs never do. The
# model report too: its gallery shows pictures of the model's dataset.
PROTECTED_PATHS = ("/similarity", "/explain", "/embed", "/rank", "/model", "/model/report")
METRICS_PATH = "/metrics"
# Where the id of the key a request came with is kept, for the request log line and the rate limiter.
KEY_ID_SCOPE = "siamcam.key_id"
METRICS_TOKEN_ID = "metrics-token"
PLAIN_KEY_ID_LENGTH = 8
_HASHED_LINE = re.compile(r"^([A-Za-z0-9._-]{1,64}):([0-9a-fA-F]{64})$")
_KEY = re.compile(r"^\S+$")


class KeyConfigError(ValueError):
    """API_KEYS / API_KEYS_FILE cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: bytes


def sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def plain_key(secret: str) -> ApiKey:
    """A key given as itself; its id is the start of its sha256, which says nothing usable about the key."""
    return ApiKey(sha256(secret).hex()[:PLAIN_KEY_ID_LENGTH], sha256(secret))


def hashed_key_line(key_id: str, secret: str) -> str:
    """The `id:sha256-hex` line that lets a keys file accept `secret` without holding it."""
    return f"{key_id}:{sha256(secret).hex()}"


def parse_keys_file(text: str, source: str) -> list[ApiKey]:
    """One key a line: `id:sha256-hex` (64 hex digits), or the key itself. Blank lines and `#` comments skipped."""
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if hashed := _HASHED_LINE.match(line):
            keys.append(ApiKey(hashed.group(1), bytes.fromhex(hashed.group(2))))
        elif _KEY.match(line):
            keys.append(plain_key(line))
        else:
            raise KeyConfigError(f"{source}, line {number}: a key cannot contain spaces; write the key alone or "
                                 "`id:sha256-hex-of-the-key` (docs/security.md)")
    return keys


def load_keys(settings: Settings) -> list[ApiKey]:
    """The keys of API_KEYS and API_KEYS_FILE together; none means the API is open."""
    keys = [plain_key(secret) for secret in settings.api_key_list]
    if settings.api_keys_file is not None:
        path = settings.api_keys_file
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise KeyConfigError(f"cannot read API_KEYS_FILE {path}: {error.strerror}; fix the path or unset "
                                 "API_KEYS_FILE to serve without keys") from error
        from_file = parse_keys_file(text, f"API_KEYS_FILE {path}")
        if not from_file:
            # A keys file that was meant to lock the API must not leave it open: refuse to start instead.
            raise KeyConfigError(f"API_KEYS_FILE {path} holds no key: add one (docs/security.md) or unset "
                                 "API_KEYS_FILE to serve without keys")
        keys += from_file
    ids = [key.id for key in keys]
    if duplicated := sorted({key_id for key_id in ids if ids.count(key_id) > 1}):
        raise KeyConfigError(f"the key id(s) {duplicated} are used twice (or a key is listed twice): give each "
                             "key its own id so that the logs tell callers apart")
    return keys


class KeyRing:
    """The accepted keys; `identify` tells which one a caller presented, in time independent of the keys."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: str) -> str | None:
        presented_digest = sha256(presented)
        found = None
        for key in self._keys:  # no early exit: every key is compared, whichever matches
            if hmac.compare_digest(key.sha256, presented_digest):
                found = key.id
        return found


def presented_credential(headers: Headers) -> str | None:
    """The key from `Authorization: Bearer <key>`, else from `X-API-Key`."""
    scheme, _, credential = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return headers.get("x-api-key", "").strip() or None


def unauthorized(presented: bool, what: str) -> Problem:
    # RFC 6750: a challenge on every 401; `invalid_token` when a credential was sent but is not accepted.
    challenge = 'Bearer realm="siamcam"' + (', error="invalid_token"' if presented else "")
    detail = (f"The credential sent is not {what} of this service: check it, or ask the service's operator."
              if presented else
              f"This endpoint needs {what}: send it as `Authorization: Bearer <key>` (or `X-API-Key: <key>`).")
    return Problem(401, "unauthorized", detail, {"WWW-Authenticate": challenge})


class AccessControlMiddleware:
    """401 for a protected endpoint without a valid API key, or /metrics without the metrics token (each only
    when configured); otherwise records the key's id in the scope and passes the request on."""

    def __init__(self, app: ASGIApp, api_keys: KeyRing, metrics_token: KeyRing) -> None:
        self.app = app
        self.api_keys = api_keys
        self.metrics_token = metrics_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ring, what = self._guard(scope)
        if ring is None:
            await self.app(scope, receive, send)
            return
        credential = presented_credential(Headers(scope=scope))
        key_id = ring.identify(credential) if credential is not None else None
        if key_id is None:
            await unauthorized(credential is not None, what).response()(scope, receive, send)
            return
        scope[KEY_ID_SCOPE] = key_id
        await self.app(scope, receive, send)

    def _guard(self, scope: Scope) -> tuple[KeyRing | None, str]:
        if scope["type"] != "http":
            return None, ""
        if scope["path"] in PROTECTED_PATHS and self.api_keys.enabled:
            return self.api_keys, "an API key"
        if scope["path"] == METRICS_PATH and self.metrics_token.enabled:
            return self.metrics_token, "the metrics token"
        return None, ""


def metrics_token_ring(settings: Settings) -> KeyRing:
    token = settings.metrics_token.get_secret_value()
    return KeyRing([ApiKey(METRICS_TOKEN_ID, sha256(token))] if token else [])


def document_api_keys(app: FastAPI) -> None:
    """Names the two ways to send a key in the OpenAPI schema, so that /docs can send one ("Authorize")."""
    plain_openapi = app.openapi

    def openapi_with_keys() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = plain_openapi()  # cached by FastAPI in app.openapi_schema: amended once
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            for path in PROTECTED_PATHS:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
        return app.openapi_schema

    app.openapi = openapi_with_keys  # type: ignore[method-assign]
