"""The model owner's side of app/ipc.py: serves one `ModelOwner` to every front process of the container.

Each front connects once. The owner answers its hello with the model's view once the model is ready, maps the
front's picture slots, then turns each `submit` into jobs of its batcher whose pictures are those slots, and
sends each job's outcome back when its batch has run. What the owner knows of its queues (their depths) rides on
every answer, so that a front can refuse work with 503 before decoding it, as the one process did. A front that
disconnects takes its waiting jobs out of the queues. The rate limits of a `memory://` store are counted here too,
once for the whole container."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from app.ipc import encode, encode_value, map_front_pictures, receive, referenced_pictures
from app.jobs import Job, QueueFull, WorkerStopped
from app.model_owner import ModelOwner
from app.ratelimit import RateLimiter
from contract.images import ImageError

logger = logging.getLogger(__name__)


class OwnerServer:
    """Serves the owner that `owner` resolves to (once the model is ready) on the Unix socket at `path`;
    `on_hello(pid)` is told of each front that has connected."""

    def __init__(self, owner: asyncio.Future[ModelOwner], rate_limiter: RateLimiter | None,
                 on_hello: Callable[[int], None]) -> None:
        self._owner = owner
        self._rate_limiter = rate_limiter
        self._on_hello = on_hello
        self._calls: set[asyncio.Future[Any]] = set()  # the loop keeps only weak references to tasks

    async def start(self, path: Path) -> asyncio.Server:
        return await asyncio.start_unix_server(self._serve_front, path=str(path))

    async def _serve_front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        jobs: dict[int, Job] = {}
        owner: ModelOwner | None = None
        try:
            hello, _ = await receive(reader)
            self._on_hello(hello["pid"])
            owner = await asyncio.shield(self._owner)
            writer.write(encode({"op": "welcome", "model": owner.view.to_message(),
                                 "capacity": {kind: owner.batcher.capacity(kind) for kind in owner.depths()}}))
            slots, _ = await receive(reader)
            pictures = map_front_pictures(hello["pid"], slots["fd"], slots["count"], tuple(slots["shape"]))
            while True:
                message, arrays = await receive(reader)
                match message["op"]:
                    case "submit":
                        self._submit(owner, writer, jobs, pictures, message, arrays)
                    case "withdraw":
                        if (job := jobs.get(message["id"])) is not None:
                            owner.withdraw(job)  # its future, cancelled, answers "withdrawn"
                    case "score":
                        scores = await owner.score_embeddings(arrays[0], list(arrays[1]))
                        writer.write(encode({"op": "answer", "id": message["id"], "scores": scores}))
                    case "rate":
                        self._start_call(writer, message["id"], self._rate(message["caller"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front has gone: its connection, and with it its waiting jobs, end here
        finally:
            for job in list(jobs.values()):
                if owner is not None and not job.future.done():
                    owner.withdraw(job)
            writer.close()

    def _submit(self, owner: ModelOwner, writer: asyncio.StreamWriter, jobs: dict[int, Job], pictures: np.ndarray,
                message: dict[str, Any], files: list[np.ndarray]) -> None:
        ids, kind = message["ids"], message["kind"]
        try:
            queued = owner.submit_all(kind, [referenced_pictures(references, pictures, files)
                                             for references in message["pictures"]])
        except (QueueFull, WorkerStopped) as error:
            reason = "queue_full" if isinstance(error, QueueFull) else "worker_stopped"
            writer.write(encode({"op": "refused", "ids": ids, "reason": reason, "depths": owner.depths()}))
            return
        for job_id, job in zip(ids, queued, strict=True):
            jobs[job_id] = job
            job.future.add_done_callback(partial(self._send_outcome, owner, writer, jobs, job_id))

    @staticmethod
    def _send_outcome(owner: ModelOwner, writer: asyncio.StreamWriter, jobs: dict[int, Job], job_id: int,
                      future: asyncio.Future[Any]) -> None:
        del jobs[job_id]
        if writer.is_closing():
            return
        answer: dict[str, Any] = {"id": job_id, "depths": owner.depths()}
        if future.cancelled():
            writer.write(encode({"op": "withdrawn", **answer}))
        elif (error := future.exception()) is not None:
            image_error = {"kind": type(error).__name__, "name": error.name} if isinstance(error, ImageError) else None
            writer.write(encode({"op": "failed", **answer, "stopped": isinstance(error, WorkerStopped),
                                 "error": str(error) or type(error).__name__, "image_error": image_error}))
        else:
            outcome = future.result()
            value, arrays = encode_value(outcome.value)
            writer.write(encode({"op": "done", **answer, "queue_wait_s": outcome.queue_wait_s,
                                 "inference_s": outcome.inference_s, "batch_started": outcome.batch_started,
                                 "value": value}, arrays))

    def _start_call(self, writer: asyncio.StreamWriter, call_id: int, answer: Any) -> None:
        task = asyncio.ensure_future(answer)
        self._calls.add(task)

        def send(done: asyncio.Future[dict[str, Any]]) -> None:
            self._calls.discard(task)
            if not writer.is_closing() and not done.cancelled() and done.exception() is None:
                writer.write(encode({"op": "answer", "id": call_id, **done.result()}))

        task.add_done_callback(send)

    async def _rate(self, caller: str) -> dict[str, Any]:
        assert self._rate_limiter is not None, "a front asked for rate limits the owner does not count"
        decision = await self._rate_limiter.take(caller)
        return {"decision": None if decision is None else decision.__dict__}

