"""Bounded queues of pairs, drained in batches by one inference worker that owns the model.

Each kind of job (similarity, explain) has its own queue. The worker picks the queue whose oldest pair has
waited longest, lets that pair wait up to `max_batch_wait_s` for others to join it (or until a full batch is
there), then runs up to `max_batch_size` pairs as one batch in a worker thread, so the event loop never blocks.
Pairs stay in their queue while they wait, so a client that gives up can take its pair back out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app import metrics

BatchRunner = Callable[[list[torch.Tensor], list[torch.Tensor]], Sequence[Any]]


class QueueFull(Exception):
    pass


@dataclass
class Outcome:
    """One pair's result, with how long it waited in the queue and how long its batch took."""

    value: Any
    queue_wait_s: float
    inference_s: float


@dataclass(eq=False)
class Job:
    kind: str
    image1: torch.Tensor
    image2: torch.Tensor
    future: asyncio.Future[Outcome]
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self, runners: dict[str, BatchRunner], max_batch_size: int, max_batch_wait_s: float, queue_capacity: int
    ) -> None:
        self._runners = runners
        self._max_batch_size = max_batch_size
        self._max_batch_wait_s = max_batch_wait_s
        self._capacity = queue_capacity
        self._queues: dict[str, deque[Job]] = {kind: deque() for kind in runners}
        self._changed = asyncio.Event()
        for kind in runners:
            metrics.QUEUE_DEPTH.labels(kind).set(0)

    def submit(self, kind: str, image1: torch.Tensor, image2: torch.Tensor) -> Job:
        """Queue one pair; raises QueueFull when its queue is at capacity."""
        queue = self._queues[kind]
        if len(queue) >= self._capacity:
            raise QueueFull(kind)
        job = Job(kind, image1, image2, asyncio.get_running_loop().create_future())
        queue.append(job)
        self._queue_changed(kind)
        return job

    def withdraw(self, job: Job) -> bool:
        """Take back a pair whose client stopped waiting; False if its batch has already started."""
        queue = self._queues[job.kind]
        if job not in queue:
            return False
        queue.remove(job)
        job.future.cancel()
        self._queue_changed(job.kind)
        return True

    def depth(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def run(self) -> None:
        """The inference worker: runs until cancelled."""
        while True:
            kind = await self._next_ready_queue()
            queue = self._queues[kind]
            jobs = [queue.popleft() for _ in range(min(self._max_batch_size, len(queue)))]
            self._queue_changed(kind)
            await self._run_batch(kind, jobs)

    async def _next_ready_queue(self) -> str:
        """The kind of the next batch, once its oldest pair has waited long enough or a full batch is there."""
        while True:
            self._changed.clear()
            waiting = [kind for kind, queue in self._queues.items() if queue]
            if not waiting:
                await self._changed.wait()
                continue
            kind = min(waiting, key=lambda k: self._queues[k][0].enqueued_at)
            queue = self._queues[kind]
            remaining = queue[0].enqueued_at + self._max_batch_wait_s - time.monotonic()
            if len(queue) >= self._max_batch_size or remaining <= 0:
                return kind
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def _run_batch(self, kind: str, jobs: list[Job]) -> None:
        started = time.monotonic()
        for job in jobs:
            metrics.QUEUE_WAIT.labels(kind).observe(started - job.enqueued_at)
        metrics.BATCH_SIZE.labels(kind).observe(len(jobs))
        try:
            results = await asyncio.to_thread(
                self._runners[kind], [job.image1 for job in jobs], [job.image2 for job in jobs]
            )
        except Exception as error:  # the whole batch failed: every waiting request learns why
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        inference_s = time.monotonic() - started
        metrics.INFERENCE_TIME.labels(kind).observe(inference_s)
        for job, value in zip(jobs, results, strict=True):
            if not job.future.done():  # its client may have given up meanwhile
                job.future.set_result(Outcome(value, started - job.enqueued_at, inference_s))

    def _queue_changed(self, kind: str) -> None:
        metrics.QUEUE_DEPTH.labels(kind).set(len(self._queues[kind]))
        self._changed.set()
