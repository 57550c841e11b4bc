"""The ASGI application: `uvicorn app.main:app`. Settings come from the environment (see settings.py)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from app.errors import install_problem_handlers
from app.lifespan import lifespan
from app.logs import configure_logging
from app.middleware import AdmissionMiddleware, RequestContextMiddleware
from app.routes import STATIC_DIR, router
from app.service import Service
from app.settings import Settings

INFERENCE_PATHS = ("/similarity", "/explain")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    # FastAPIOffline serves Swagger UI's and ReDoc's files itself: /docs and /redoc work without internet.
    app = FastAPIOffline(
        title="siamcam",
        version="0.1.0",
        summary="Explainable image similarity: a Siamese network scores two images, Grad-CAM shows why.",
        lifespan=lifespan,
    )
    app.state.service = Service(settings)
    install_problem_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(
        AdmissionMiddleware,
        drain=app.state.service.drain,
        paths=INFERENCE_PATHS,
        max_body_bytes=settings.max_body_bytes,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(RequestContextMiddleware)  # added last: outermost, so it sees every answer
    return app


app = create_app()
