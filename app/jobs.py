"""The work the HTTP side hands to the model's owner, and what comes back: jobs, their outcomes, and the
interface every owner offers (`Inference`): the batcher in this process (app/model_owner.py), or the model-owner
process seen from a front process (app/owner_client.py). No torch here: front processes import this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from contract.explanation import Method

# The queue of each kind of job. Pairs: similarity, and one explain queue per method (their batches never mix).
SIMILARITY_QUEUE = "similarity"
EXPLAIN_QUEUES: dict[Method, str] = {"gradcam": "explain", "contributions": "contributions"}
# Single images, embedded for /embed and /rank.
EMBED_QUEUE = "embed"


class QueueFull(Exception):
    pass


class WorkerStopped(Exception):
    """The inference worker has stopped: no job will be run by this replica any more."""


@dataclass
class Outcome:
    """One job's result, with how long it waited in the queue and how long its batch took; `batch_started`
    tells the batches of a request's several jobs apart."""

    value: Any
    queue_wait_s: float
    inference_s: float
    batch_started: float = 0.0


@dataclass(frozen=True, eq=False)
class EncodedJpeg:
    """An upload the model's process decodes on its GPU (DECODE_DEVICE=cuda, app/device_decode.py) instead of a
    picture decoded here: the JPEG file's bytes, with what its header said."""

    name: str  # how errors name the upload ("image1")
    data: np.ndarray  # the file, uint8 [bytes]
    orientation: int  # EXIF orientation, 1 to 8


# What a job carries for each image: the uint8 picture [3, H, W] at the model's input size, or a JPEG to decode.
JobPicture = np.ndarray | EncodedJpeg


@dataclass(eq=False)
class Job:
    kind: str
    pictures: tuple[JobPicture, ...]  # a pair, or one picture
    future: asyncio.Future[Outcome]
    enqueued_at: float = field(default_factory=time.monotonic)


class Inference(Protocol):
    """What the HTTP side asks of the model's owner."""

    @property
    def stopped(self) -> bool:
        """Whether the inference worker has stopped (every job now fails with WorkerStopped)."""

    def has_room(self, kind: str, jobs: int = 1) -> bool:
        """Whether `submit_all` would take this many jobs of this kind now (checked before decoding them)."""

    def submit_all(self, kind: str, jobs: Sequence[tuple[JobPicture, ...]]) -> list[Job]:
        """Queue every job of one request, or none: QueueFull when they do not all fit, WorkerStopped once the
        worker has stopped. Each job's future gets its Outcome."""

    def withdraw(self, job: Job) -> bool:
        """Take back a job whose client stopped waiting; False if its batch has already started."""

    async def score_embeddings(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
        """The score of the query's embedding with each candidate's, by the model's own `similarity`."""
