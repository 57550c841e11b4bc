"""Bounded queues of jobs, drained in batches by one inference worker that owns the model.

A job is what one runner call takes per item: a pair of pictures (similarity, explain, contributions) or one
picture (embed, whose batches /embed and /rank fill). Each kind of job has its own queue, with its own batch size
and capacity where they differ from the defaults (app/lifespan.py). The worker never waits for jobs that are not
there: when the model is idle, a job that arrives runs at once, alone; the jobs that arrive while a batch
runs wait for it and form the next batch, up to `max_batch_size` of one queue, which starts as soon as the model
is free. So batches grow with the load and a lone request pays no batching delay.

When several queues hold jobs, a full batch goes before a partial one, so that the model does the most work per
run; `max_batch_wait_s` bounds how long a partial batch may be passed over while the model is busy: once its
oldest job has waited that long, it goes before full batches (the oldest first among those ready), so neither
queue starves. Batches run on the model's own thread, so the event loop never blocks and the model never
waits behind other work in a shared thread pool. Jobs stay in their queue while
they wait, so a client that gives up can take its jobs back out.

A batch that fails is run again one job at a time, so that only the jobs that fail on their own fail. If the
model then fails even on the warm-up pair (a broken device, a model that went wrong), the worker stops: every
job waiting, and every job submitted later, fails with WorkerStopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from app import metrics
from app.jobs import Job, JobPicture, Outcome, QueueFull, WorkerStopped

T = TypeVar("T")
# Called with one list per position of the jobs' pictures (images1, images2 for pairs; images for single images).
BatchRunner = Callable[..., Sequence[Any]]


class ModelBroken(RuntimeError):
    """The model fails even on the pair it passed at warm-up: only a restart can help."""


def _timed(runner: BatchRunner, *inputs: list[JobPicture]) -> tuple[Sequence[Any], float, float]:
    """`runner`'s results, when it started and how long it took, timed on the model thread itself: timed from the
    event loop, a batch would also count the hand-over to the thread and the loop's turnaround back to the batch,
    which grow with the load, and `timings_ms.inference` would no longer be the model's work alone."""
    started = time.monotonic()
    results = runner(*inputs)
    return results, started, time.monotonic() - started


@dataclass(frozen=True)
class QueueLimits:
    max_batch_size: int  # most jobs per batch
    capacity: int  # most jobs waiting; beyond, QueueFull


class Batcher:
    def __init__(
        self, runners: dict[str, BatchRunner], self_check: Callable[[], object], max_batch_size: int,
        max_batch_wait_s: float, queue_capacity: int, model_thread: ThreadPoolExecutor,
        limits: Mapping[str, QueueLimits] | None = None,
    ) -> None:
        """`self_check` runs the model on the warm-up pair, raising if it fails. Every model call runs on
        `model_thread` (app/torch_threads.py), which the batcher shuts down when it stops. Each queue batches up
        to `max_batch_size` jobs and holds `queue_capacity`, unless `limits` says otherwise for its kind."""
        self._runners = runners
        self._self_check = self_check
        self._limits = {kind: QueueLimits(max_batch_size, queue_capacity) for kind in runners} | dict(limits or {})
        self._max_batch_wait_s = max_batch_wait_s
        self._queues: dict[str, deque[Job]] = {kind: deque() for kind in runners}
        self._changed = asyncio.Event()
        self._running: list[Job] = []  # the batch in progress
        self.stopped = False
        # One thread for every model call: batches are sequential anyway, and timings_ms.inference stays the
        # model's time, never a wait for a thread busy with decoding or rendering.
        self._model_thread = model_thread
        for kind in runners:
            metrics.QUEUE_DEPTH.labels(kind).set(0)

    def submit_all(self, kind: str, jobs: Sequence[tuple[JobPicture, ...]]) -> list[Job]:
        """Queue every job of one request, or none: QueueFull when they do not all fit in their queue."""
        if self.stopped:
            raise WorkerStopped
        if not self.has_room(kind, len(jobs)):
            raise QueueFull(kind)
        loop = asyncio.get_running_loop()
        queued = [Job(kind, tuple(pictures), loop.create_future()) for pictures in jobs]
        self._queues[kind].extend(queued)
        self._queue_changed(kind)
        return queued

    def has_room(self, kind: str, jobs: int = 1) -> bool:
        """Whether `submit_all` would take this many jobs of this kind now (checked before decoding them)."""
        return len(self._queues[kind]) + jobs <= self._limits[kind].capacity

    def withdraw(self, job: Job) -> bool:
        """Take back a job whose client stopped waiting; False if its batch has already started."""
        queue = self._queues[job.kind]
        if job not in queue:
            return False
        queue.remove(job)
        job.future.cancel()
        self._queue_changed(job.kind)
        return True

    def depths(self) -> dict[str, int]:
        """The jobs waiting in each queue."""
        return {kind: len(queue) for kind, queue in self._queues.items()}

    def capacity(self, kind: str) -> int:
        return self._limits[kind].capacity

    async def run(self) -> None:
        """The inference worker: runs until cancelled, or until it fails (ModelBroken, or a bug)."""
        try:
            while True:
                kind = await self._next_ready_queue()
                queue = self._queues[kind]
                batch_size = self._limits[kind].max_batch_size
                self._running = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
                self._queue_changed(kind)
                self._observe_start(kind, self._running)
                await self._run_batch(kind, self._running)
        finally:
            self.stopped = True
            self._model_thread.shutdown(wait=False)
            stranded = [*self._running, *(job for queue in self._queues.values() for job in queue)]
            for kind, queue in self._queues.items():
                queue.clear()
                self._queue_changed(kind)
            for job in stranded:
                if not job.future.done():
                    job.future.set_exception(WorkerStopped())

    async def _next_ready_queue(self) -> str:
        """The kind of the next batch, as soon as any queue holds a job: the model is free, so nothing waits."""
        while True:
            self._changed.clear()
            waiting = [kind for kind, queue in self._queues.items() if queue]
            if waiting:
                now = time.monotonic()
                return min(waiting, key=lambda kind: self._precedence(kind, now))
            await self._changed.wait()

    def _precedence(self, kind: str, now: float) -> tuple[bool, float]:
        """Sorts first: full batches and partial ones overdue by `max_batch_wait_s`, then the other partial ones;
        the oldest first within each."""
        queue = self._queues[kind]
        oldest = queue[0].enqueued_at
        ready = len(queue) >= self._limits[kind].max_batch_size or now - oldest >= self._max_batch_wait_s
        return (not ready, oldest)

    async def _run_batch(self, kind: str, jobs: list[Job]) -> None:
        try:
            # One list per position: images1 and images2 of pairs, or the single images.
            inputs = [list(position) for position in zip(*(job.pictures for job in jobs), strict=True)]
            results, started, inference_s = await self._on_model_thread(_timed, self._runners[kind], *inputs)
            # Inside the `try`: a runner returning the wrong number of results fails its batch, not the worker.
            handed_out = list(zip(jobs, results, strict=True))
        except Exception as error:
            await self._after_failure(kind, jobs, error)
            return
        metrics.INFERENCE_TIME.labels(kind).observe(inference_s)
        for job, value in handed_out:
            if not job.future.done():  # its client may have given up meanwhile
                job.future.set_result(Outcome(value, started - job.enqueued_at, inference_s, started))

    async def _after_failure(self, kind: str, jobs: list[Job], error: Exception) -> None:
        """Stop if the model is broken; else run the jobs of a failed batch again one by one, so that one bad
        job fails alone; a job that fails alone gets the error."""
        try:
            await self._on_model_thread(self._self_check)
        except Exception as check_error:
            raise ModelBroken(f"the model fails even on the warm-up pair ({check_error}) after a batch failed "
                              f"({error}); restart the service") from error
        if len(jobs) == 1:
            if not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        for job in jobs:
            if not job.future.done():
                await self._run_batch(kind, [job])

    async def _on_model_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, function, *args)

    @staticmethod
    def _observe_start(kind: str, jobs: list[Job]) -> None:
        started = time.monotonic()
        for job in jobs:
            metrics.QUEUE_WAIT.labels(kind).observe(started - job.enqueued_at)
        metrics.BATCH_SIZE.labels(kind).observe(len(jobs))

    def _queue_changed(self, kind: str) -> None:
        metrics.QUEUE_DEPTH.labels(kind).set(len(self._queues[kind]))
        self._changed.set()
