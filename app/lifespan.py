"""Start-up and shutdown: load and warm up the model, run the inference worker, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from functools import partial

from fastapi import FastAPI

from app.batcher import Batcher
from app.model import EXPLAIN_QUEUES, ModelLoadError, ServedModel, explain_pairs, load_model, score_pairs, warm_up
from app.service import Service
from app.settings import Settings
from app.shutdown import drain_on_signals

logger = logging.getLogger(__name__)
EXIT_MODEL_UNAVAILABLE = 1


def _load_and_warm_up(settings: Settings) -> ServedModel:
    model = load_model(settings.model_dir, settings.device)
    warm_up(model)
    return model


def _report_worker_failure(worker: asyncio.Task[None]) -> None:
    if not worker.cancelled() and worker.exception() is not None:
        logger.critical("the inference worker stopped: requests will time out", exc_info=worker.exception())


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    settings = service.settings
    try:
        model = await asyncio.to_thread(_load_and_warm_up, settings)
    except ModelLoadError as error:
        logger.critical(f"cannot start: {error}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        # Leave now: through uvicorn, a failed start-up is logged as a traceback plus more lines, and
        # restarting would fail the same way. One clear line and a non-zero status are what an operator needs.
        os._exit(EXIT_MODEL_UNAVAILABLE)
    batcher = Batcher(
        {"similarity": partial(score_pairs, model),
         **{EXPLAIN_QUEUES[method]: partial(explain_pairs, model, method=method) for method in model.methods}},
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000,
        queue_capacity=settings.queue_capacity,
    )
    worker = asyncio.create_task(batcher.run(), name="inference-worker")
    worker.add_done_callback(_report_worker_failure)
    service.batcher = batcher
    service.model = model
    logger.info("ready", extra={
        "model": model.manifest.name, "version": model.manifest.version, "device": str(model.device),
    })
    try:
        with drain_on_signals(service.drain, settings.drain_grace_s):
            yield
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
