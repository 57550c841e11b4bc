"""The model's owner: the one place that loads the model, warms it up and runs it, behind the batcher.

With HTTP_WORKERS=1 it lives in the one uvicorn process, beside the HTTP side; with more, in the container's
main process (app/container.py), which serves it to the front processes (app/owner_server.py). Either way the
HTTP side sees it through `Inference` (app/jobs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

import numpy as np
import torch

from app.backbone import with_compiled_backbone
from app.batcher import Batcher, QueueLimits
from app.jobs import EMBED_QUEUE, EXPLAIN_QUEUES, SIMILARITY_QUEUE, Job, JobPicture
from app.model import (
    ServedModel, embed_pictures, explain_pairs, load_model, score_blank_pair, score_embeddings, score_pairs, warm_up,
    warm_up_device_decoding, warm_up_embeddings,
)
from app.model_view import ModelLoadError, ModelView
from app.settings import Settings
from app.torch_threads import model_thread_executor, model_threads_on, run_torch_here_only

logger = logging.getLogger(__name__)


class ModelOwner:
    """The loaded model and the batcher that runs it; `worker` is the inference worker's task."""

    def __init__(self, model: ServedModel, batcher: Batcher, worker: asyncio.Task[None], model_threads: int) -> None:
        self.model = model
        self.model_threads = model_threads  # torch's threads on the model thread, as read there after warm-up
        self.view: ModelView = model.view()
        self.batcher = batcher
        self.worker = worker

    @property
    def stopped(self) -> bool:
        return self.batcher.stopped

    def has_room(self, kind: str, jobs: int = 1) -> bool:
        return self.batcher.has_room(kind, jobs)

    def submit_all(self, kind: str, jobs: Sequence[tuple[JobPicture, ...]]) -> list[Job]:
        return self.batcher.submit_all(kind, jobs)

    def withdraw(self, job: Job) -> bool:
        return self.batcher.withdraw(job)

    async def score_embeddings(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
        return score_embeddings(self.model, query, candidates)

    def depths(self) -> dict[str, int]:
        return self.batcher.depths()

    def on_stop(self, callback: Callable[[BaseException | None], object]) -> None:
        """Call `callback` with the reason if the inference worker stops by itself (see app/batcher.py)."""

        def stopped(worker: asyncio.Task[None]) -> None:
            if not worker.cancelled():
                callback(worker.exception())

        self.worker.add_done_callback(stopped)

    def abandon(self) -> None:
        """Stop the worker: the jobs still waiting fail with WorkerStopped (the grace period is over)."""
        self.worker.cancel()


def _load_and_warm_up(settings: Settings) -> tuple[ServedModel, int]:
    """Run on the model thread: the model loaded and warmed up, and the torch threads it runs on there."""
    model = load_model(settings.model_dir, settings.device, settings.precision)
    if settings.decode_device == "cuda" and model.device.type != "cuda":
        raise ModelLoadError(f"DECODE_DEVICE=cuda decodes JPEG uploads on the model's GPU, but the model runs on "
                             f"{model.device}: set DEVICE=cuda (or auto, on a machine with a GPU), or DECODE_DEVICE=cpu")
    torch.set_num_threads(model_threads_on(model.device.type, settings.model_threads))
    if settings.compile == "auto":
        model = with_compiled_backbone(model, settings.compile_cache_dir)
    warm_up(model)
    warm_up_embeddings(model)
    if settings.decode_device == "cuda":
        warm_up_device_decoding(model)
    return model, torch.get_num_threads()


@contextlib.asynccontextmanager
async def running_model_owner(settings: Settings) -> AsyncIterator[ModelOwner]:
    """The model loaded, warmed up and served by a running inference worker, until the block ends. Raises
    ModelLoadError (app/model.py) when the model cannot be served."""
    run_torch_here_only()  # the event loop's thread
    model_thread = model_thread_executor()  # sets the memory policy first (contract/memory.py)
    # Loaded and warmed up on the thread that will run it: no other thread may run torch in parallel.
    model, model_threads = await asyncio.get_running_loop().run_in_executor(model_thread, _load_and_warm_up, settings)
    batch_size = settings.batch_size_on(model.device.type)
    logger.info(f"model warmed up on {model.device}, {model_threads} torch thread(s), batches of up to {batch_size}",
                extra={"device": str(model.device), "model_threads": model_threads, "max_batch_size": batch_size})
    batcher = Batcher(
        {SIMILARITY_QUEUE: partial(score_pairs, model),
         **{EXPLAIN_QUEUES[method]: partial(explain_pairs, model, method=method) for method in model.methods},
         EMBED_QUEUE: partial(embed_pictures, model)},
        self_check=partial(score_blank_pair, model),
        max_batch_size=batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000,
        queue_capacity=settings.queue_capacity,
        model_thread=model_thread,
        # Single images, MAX_BATCH_SIZE per batch: the images a pair batch runs through the backbone at once (one
        # side, then the other), the size measured best on the CPU; 16 at once took twice as long per image on the
        # model's thread (bench/RESULTS.md, "One image against many").
        limits={EMBED_QUEUE: QueueLimits(batch_size, settings.embed_queue_capacity)},
    )
    worker = asyncio.create_task(batcher.run(), name="inference-worker")
    try:
        yield ModelOwner(model, batcher, worker, model_threads)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # a failed worker has been reported
            await worker
