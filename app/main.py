"""The ASGI application: `uvicorn app.main:app`, or each front process of `python -m app` (app/container.py).
Settings come from the environment (see settings.py)."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.formparsers import MultiPartParser
from starlette.middleware.cors import CORSMiddleware

from app.errors import install_problem_handlers
from app.headers import SecurityHeadersMiddleware, cors_options
from app.lifespan import lifespan
from app.logs import configure_logging
from app.middleware import AdmissionMiddleware, RequestContextMiddleware
from app.owner_client import OwnerRateLimits
from app.ratelimit import Limits, RateLimiter, RateLimitMiddleware
from app.routes import STATIC_DIR, router
from app.security import (
    PROTECTED_PATHS, AccessControlMiddleware, KeyConfigError, KeyRing, document_api_keys, load_keys,
    metrics_token_ring,
)
from app.service import Service
from app.settings import Settings

EXIT_BAD_KEYS = 1


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    keep_uploads_in_memory(settings.max_upload_bytes)
    # FastAPIOffline serves Swagger UI's and ReDoc's files itself: /docs and /redoc work without internet.
    app = FastAPIOffline(
        title="siamcam",
        version="0.1.0",
        summary="Explainable image similarity: a Siamese network scores two images, Grad-CAM shows why.",
        description="Compare two images on [the web page](/) or with `POST /similarity` and `POST /explain`. "
        "How good the served model is, with its figures: [the model report](/model/report).",
        lifespan=lifespan,
    )
    app.state.service = Service(settings)
    install_problem_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Middleware runs from the last added (outermost) to the first: a request is checked for its key, then its
    # rate, then admitted, all before its body is read.
    app.add_middleware(
        AdmissionMiddleware,
        drain=app.state.service.drain,
        max_body_bytes=settings.max_body_bytes_by_path,
        retry_after_s=settings.retry_after_s,
    )
    if settings.rate_limit_per_s is not None:
        app.add_middleware(RateLimitMiddleware, limiter=rate_limits(settings, app.state.service),
                           paths=PROTECTED_PATHS)
    api_keys = KeyRing(load_keys(settings))
    if api_keys.enabled:
        document_api_keys(app)
    app.add_middleware(AccessControlMiddleware, api_keys=api_keys, metrics_token=metrics_token_ring(settings))
    # Outside the key check: preflights carry no key, and a 401 or 429 must be readable by an allowed page.
    app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origin_list))
    app.add_middleware(RequestContextMiddleware)  # sees every answer: logs and counts it
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: on every answer, the request log's own included
    return app


def rate_limits(settings: Settings, service: Service) -> Limits:
    """The limiter of this process: its own store's, or, in a front process whose limits count in memory, the
    model owner's, which counts for every front of the container."""
    if settings.owner_socket is not None and settings.rate_limit_counts_in_memory:
        return OwnerRateLimits(settings.rate_limit_bucket_size, settings.rate_limit_window_s,
                               lambda: service.inference)
    return RateLimiter(settings.rate_limit_bucket_size, settings.rate_limit_window_s, settings.rate_limit_storage)


def keep_uploads_in_memory(max_upload_bytes: int) -> None:
    """Have Starlette keep every upload this service accepts in memory while it parses the form.

    Decoding reads each upload whole into memory anyway (app/inference.py); Starlette would first write any file
    over 1 MB (a phone photo's 2-3 MB) to a temporary file on disk and read it back. No memory is added: only the
    disk round trip is saved (within what runs vary in bench/RESULTS.md, "Real photos"). Starlette reads this
    class attribute for every form it parses; tests/app/test_endpoints.py checks that it still does.
    """
    MultiPartParser.spool_max_size = max_upload_bytes


def _app_from_environment() -> FastAPI:
    """The app uvicorn serves. Keys it cannot use end the process with one line saying what to fix, as a bad
    model does (lifespan.py), rather than a traceback through uvicorn's import of this module."""
    try:
        return create_app()
    except KeyConfigError as error:
        logging.getLogger(__name__).critical(f"cannot start: {error}")
        sys.exit(EXIT_BAD_KEYS)


app = _app_from_environment()
