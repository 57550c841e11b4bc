"""Start-up and shutdown: reach the model's owner (load the model here, or connect to the container's model-owning
process), run until a signal, drain, and exit non-zero when the owner can no longer run the model."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from fastapi import FastAPI

from app.admission import ImageWork, PixelBudget, SharedPixelBudget
from app.jobs import Inference
from app.model_view import ModelLoadError, ModelView
from app.owner_client import OwnerClient
from app.service import Service
from app.settings import Settings
from app.shutdown import drain_on_signals

logger = logging.getLogger(__name__)
EXIT_MODEL_UNAVAILABLE = 1


class Owner(Inference, Protocol):
    """What the lifespan needs of an owner beyond `Inference`: app/model_owner.py's or app/owner_client.py's."""

    view: ModelView

    def on_stop(self, callback: Callable[[BaseException | None], object]) -> None: ...

    def abandon(self) -> None: ...


def _exit_now(status: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(status)


def _owner(settings: Settings) -> contextlib.AbstractAsyncContextManager[Owner]:
    if settings.owner_socket is None:
        from app.model_owner import running_model_owner  # torch: only where the model runs

        return running_model_owner(settings)
    from app.owner_client import connected_owner, slots_per_front

    # The pictures the owner's queues hold when full: three queues of pairs, one of single images.
    pictures = 3 * 2 * settings.queue_capacity + settings.embed_queue_capacity
    largest = max(settings.max_embed_images, 1 + settings.max_rank_candidates)
    return connected_owner(settings.owner_socket,
                           lambda _: slots_per_front(pictures, settings.http_workers, largest))


def _image_work(settings: Settings) -> ImageWork:
    """This process's image threads and its budget of pixels: with several front processes, each has its share of
    IMAGE_WORKERS, and MAX_DECODE_PIXELS_IN_FLIGHT is the container's, shared by all of them."""
    if settings.owner_socket is None:
        from app.torch_threads import run_torch_here_only

        return ImageWork(settings.image_workers, PixelBudget(settings.max_decode_pixels_in_flight),
                         on_thread_start=run_torch_here_only)
    assert settings.pixel_counters_fd is not None, "app/container.py passes the counters to every front"
    return ImageWork(math.ceil(settings.image_workers / settings.http_workers),
                     SharedPixelBudget(settings.max_decode_pixels_in_flight, settings.pixel_counters_fd,
                                       settings.front_index))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    settings = service.settings
    restart_requested = False
    async with contextlib.AsyncExitStack() as stack:
        try:
            owner = await stack.enter_async_context(_owner(settings))
        except ModelLoadError as error:
            logger.critical(f"cannot start: {error}")
            # Leave now: through uvicorn, a failed start-up is logged as a traceback plus more lines, and
            # restarting would fail the same way. One clear line and a non-zero status are what an operator needs.
            _exit_now(EXIT_MODEL_UNAVAILABLE)
        images = _image_work(settings)
        stack.callback(images.close)
        # Past the grace period, the requests still waiting are answered 503.
        with drain_on_signals(service.drain, settings.drain_grace_s, on_grace_over=owner.abandon) as stop:

            def on_owner_stop(reason: BaseException | None) -> None:
                nonlocal restart_requested
                logger.critical("the inference worker stopped: this replica answers 503 and exits with status "
                                f"{EXIT_MODEL_UNAVAILABLE} to be restarted", exc_info=reason)
                if isinstance(owner, OwnerClient):
                    # The container's main process has gone, and with it every job in flight: nothing to drain.
                    _exit_now(EXIT_MODEL_UNAVAILABLE)
                # /readyz is already 503 and requests get 503; leave, to be restarted.
                restart_requested = stop()

            owner.on_stop(on_owner_stop)
            service.inference = owner
            service.images = images
            service.model = owner.view
            logger.info("ready", extra={
                "model": owner.view.manifest.name, "version": owner.view.manifest.version,
                "device": owner.view.device, "backbone": owner.view.backbone, "precision": owner.view.precision,
            })
            yield
    if restart_requested:
        _exit_now(EXIT_MODEL_UNAVAILABLE)  # not the status of the SIGTERM uvicorn would re-raise: we failed
