"""A front process's side of app/ipc.py: the model owner, seen through one connection, as `Inference`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.ipc import IMAGE_ERRORS, PictureSlots, decode_value, encode, picture_references, receive
from app.jobs import EncodedJpeg, Job, JobPicture, Outcome, QueueFull, WorkerStopped
from app.model_view import ModelLoadError, ModelView
from app.ratelimit import Decision


class JobFailed(RuntimeError):
    """The owner's batch failed on this job alone: what an exception of the model is in the one process."""


class OwnerClient:
    """Jobs go to the owner with their pictures in `slots`; outcomes come back on the connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, view: ModelView,
                 capacity: dict[str, int], slots: PictureSlots) -> None:
        self.view = view
        self._reader, self._writer = reader, writer
        self._capacity = capacity
        self._depths = dict.fromkeys(capacity, 0)
        self._slots = slots
        self._ids = itertools.count()
        self._jobs: dict[int, tuple[Job, list[int]]] = {}  # by id: the job and its picture slots
        self._job_ids: dict[Job, int] = {}
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._on_stop: list[Callable[[BaseException | None], object]] = []
        self._stopped = False
        self._closing = False  # closed by this front's own shutdown: not the owner going away
        self._listener = asyncio.create_task(self._listen(), name="owner-connection")

    @property
    def stopped(self) -> bool:
        return self._stopped

    def has_room(self, kind: str, jobs: int = 1) -> bool:
        return self._depths[kind] + jobs <= self._capacity[kind] and jobs <= self._slots.free

    def submit_all(self, kind: str, jobs: Sequence[tuple[JobPicture, ...]]) -> list[Job]:
        if self._stopped:
            raise WorkerStopped
        decoded = [[picture for picture in pictures if not isinstance(picture, EncodedJpeg)] for pictures in jobs]
        if not self.has_room(kind, len(jobs)) or sum(map(len, decoded)) > self._slots.free:
            raise QueueFull(kind)
        loop = asyncio.get_running_loop()
        queued, ids, references, files = [], [], [], []
        for pictures, decoded_pictures in zip(jobs, decoded, strict=True):
            job_id, job_slots = next(self._ids), self._slots.take(decoded_pictures)
            job = Job(kind, tuple(pictures), loop.create_future())
            self._jobs[job_id] = (job, job_slots)
            self._job_ids[job] = job_id
            queued.append(job)
            ids.append(job_id)
            references.append(picture_references(pictures, job_slots, files))
        self._depths[kind] += len(jobs)  # until the owner says otherwise
        self._writer.write(encode({"op": "submit", "kind": kind, "ids": ids, "pictures": references}, files))
        return queued

    def withdraw(self, job: Job) -> bool:
        """The job's future is cancelled at once; its slots come back when the owner has taken it out, or has
        finished its batch."""
        job_id = self._job_ids.get(job)
        if job_id is not None and not self._stopped:
            self._writer.write(encode({"op": "withdraw", "id": job_id}))
        job.future.cancel()
        return True

    async def score_embeddings(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
        return (await self._call({"op": "score"}, [query, np.stack(candidates)]))["scores"]

    async def take_rate(self, caller: str) -> Decision | None:
        """Count one request of `caller` in the owner's rate limits (those of a memory:// store)."""
        decision = (await self._call({"op": "rate", "caller": caller}))["decision"]
        return None if decision is None else Decision(**decision)

    def on_stop(self, callback: Callable[[BaseException | None], object]) -> None:
        """Call `callback` with the reason once the owner has gone."""
        self._on_stop.append(callback)

    def abandon(self) -> None:
        """Fail every job still waiting with WorkerStopped (the grace period is over)."""
        for job, _ in self._jobs.values():
            if not job.future.done():
                job.future.set_exception(WorkerStopped())

    async def close(self) -> None:
        self._closing = True
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._listener
        self._writer.close()
        self._slots.close()

    async def _call(self, message: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> dict[str, Any]:
        if self._stopped:
            raise WorkerStopped
        call_id = next(self._ids)
        answer = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._writer.write(encode({**message, "id": call_id}, arrays))
        try:
            return await answer
        finally:
            self._calls.pop(call_id, None)

    async def _listen(self) -> None:
        try:
            while True:
                message, arrays = await receive(self._reader)
                self._depths.update(message.get("depths", {}))
                if message["op"] == "answer":
                    if (call := self._calls.get(message["id"])) is not None and not call.done():
                        call.set_result(message)
                elif message["op"] == "refused":
                    error = QueueFull if message["reason"] == "queue_full" else WorkerStopped
                    for job_id in message["ids"]:
                        self._end(job_id, error())
                else:
                    self._end(job_id=message["id"], result=self._result(message, arrays))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._stopped = True
            for job_id in list(self._jobs):
                self._end(job_id, WorkerStopped())
            for call in self._calls.values():
                if not call.done():
                    call.set_exception(WorkerStopped())
            if not self._closing:
                for callback in self._on_stop:
                    callback(WorkerStopped("the model owner process has gone"))

    @staticmethod
    def _result(message: dict[str, Any], arrays: list[np.ndarray]) -> Outcome | BaseException | None:
        match message["op"]:
            case "done":
                return Outcome(decode_value(message["value"], arrays), message["queue_wait_s"],
                               message["inference_s"], message["batch_started"])
            case "failed":
                if (image_error := message.get("image_error")) is not None:
                    return IMAGE_ERRORS[image_error["kind"]](image_error["name"], message["error"])
                return WorkerStopped() if message["stopped"] else JobFailed(message["error"])
        return None  # withdrawn

    def _end(self, job_id: int, result: Outcome | BaseException | None) -> None:
        """The job's last message: its slots are free again, and its future gets the result if it still waits."""
        job, slots = self._jobs.pop(job_id)
        del self._job_ids[job]
        self._slots.give_back(slots)
        if job.future.done() or result is None:
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)


@contextlib.asynccontextmanager
async def connected_owner(path: Path, picture_slots: Callable[[ModelView], int]) -> AsyncIterator[OwnerClient]:
    """The owner at `path`, once its model is ready, with `picture_slots(view)` slots of shared pictures."""
    try:
        # The owner listens before it starts its fronts: a socket that refuses means that it has gone.
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(encode({"op": "hello", "pid": os.getpid()}))
        welcome, _ = await receive(reader)  # sent once the model is loaded and warmed up
    except (OSError, asyncio.IncompleteReadError) as error:
        raise ModelLoadError(f"the model owner process at {path} has gone before its model was ready ({error!r}); "
                             "its own log lines say why") from error
    view = ModelView.from_message(welcome["model"])
    slots = PictureSlots(picture_slots(view), (3, *view.input_size))
    writer.write(encode({"op": "pictures", "fd": slots.fd, "count": slots.count, "shape": list(slots.shape)}))
    client = OwnerClient(reader, writer, view, welcome["capacity"], slots)
    try:
        yield client
    finally:
        await client.close()


def slots_per_front(total_pictures: int, fronts: int, largest_request: int) -> int:
    """A front's share of the pictures the owner's queues hold, plus one request of the most pictures."""
    return math.ceil(total_pictures / fronts) + largest_request


class OwnerRateLimits:
    """A front's rate limits when they count in memory (RATE_LIMIT_STORAGE=memory://): counted once for the whole
    container, by the model owner, so that N fronts do not allow N times the configured rate. Until the front has
    reached the owner, and once it has gone, requests go unlimited (they are refused with 503 anyway)."""

    def __init__(self, burst: int, window_s: int, owner: Callable[[], object]) -> None:
        self.burst = burst
        self.window_s = window_s
        self._owner = owner

    async def take(self, caller: str) -> Decision | None:
        client = self._owner()
        if not isinstance(client, OwnerClient) or client.stopped:
            return None
        try:
            return await client.take_rate(caller)
        except WorkerStopped:
            return None
