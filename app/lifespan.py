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

from app.admission import ImageWork
from app.backbone import with_compiled_backbone
from app.batcher import Batcher, QueueLimits
from app.model import (
    EMBED_QUEUE, EXPLAIN_QUEUES, ModelLoadError, ServedModel, embed_pictures, explain_pairs, load_model,
    score_blank_pair, score_pairs, warm_up, warm_up_embeddings,
)
from app.service import Service
from app.settings import Settings
from app.shutdown import drain_on_signals
from app.torch_threads import model_thread_executor, run_torch_here_only

logger = logging.getLogger(__name__)
EXIT_MODEL_UNAVAILABLE = 1


def _load_and_warm_up(settings: Settings) -> ServedModel:
    model = load_model(settings.model_dir, settings.device)
    if settings.compile == "auto":
        model = with_compiled_backbone(model, settings.compile_cache_dir)
    warm_up(model)
    warm_up_embeddings(model)
    return model


def _exit_now(status: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    settings = service.settings
    run_torch_here_only()  # the event loop's thread
    model_thread = model_thread_executor()  # sets the memory policy first: before any other thread of ours
    try:
        # Loaded and warmed up on the thread that will run it: no other thread may run torch in parallel.
        model = await asyncio.get_running_loop().run_in_executor(model_thread, _load_and_warm_up, settings)
    except ModelLoadError as error:
        logger.critical(f"cannot start: {error}")
        # Leave now: through uvicorn, a failed start-up is logged as a traceback plus more lines, and
        # restarting would fail the same way. One clear line and a non-zero status are what an operator needs.
        _exit_now(EXIT_MODEL_UNAVAILABLE)
    batcher = Batcher(
        {"similarity": partial(score_pairs, model),
         **{EXPLAIN_QUEUES[method]: partial(explain_pairs, model, method=method) for method in model.methods},
         EMBED_QUEUE: partial(embed_pictures, model)},
        self_check=partial(score_blank_pair, model),
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000,
        queue_capacity=settings.queue_capacity,
        model_thread=model_thread,
        # Single images, MAX_BATCH_SIZE per batch: the images a pair batch runs through the backbone at once (one
        # side, then the other), the size measured best on the CPU; 16 at once took twice as long per image on the
        # model's thread (bench/RESULTS.md, "One image against many").
        limits={EMBED_QUEUE: QueueLimits(settings.max_batch_size, settings.embed_queue_capacity)},
    )
    images = ImageWork(settings.image_workers, settings.max_decode_pixels_in_flight)
    worker = asyncio.create_task(batcher.run(), name="inference-worker")
    restart_requested = False
    try:
        # Past the grace period, stopping the worker answers the requests still waiting with 503.
        with drain_on_signals(service.drain, settings.drain_grace_s, on_grace_over=worker.cancel) as stop:

            def on_worker_end(task: asyncio.Task[None]) -> None:
                nonlocal restart_requested
                if task.cancelled():
                    return  # shutting down
                # /readyz is already 503 and requests get 503 (the batcher has stopped); leave, to be restarted.
                logger.critical("the inference worker stopped: this replica answers 503 and exits with status "
                                f"{EXIT_MODEL_UNAVAILABLE} to be restarted", exc_info=task.exception())
                restart_requested = stop()

            worker.add_done_callback(on_worker_end)
            service.batcher = batcher
            service.images = images
            service.model = model
            logger.info("ready", extra={
                "model": model.manifest.name, "version": model.manifest.version, "device": str(model.device),
                "backbone": model.backbone,
            })
            yield
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # a failed worker has been reported
            await worker
        images.close()
    if restart_requested:
        _exit_now(EXIT_MODEL_UNAVAILABLE)  # not the status of the SIGTERM uvicorn would re-raise: we failed
