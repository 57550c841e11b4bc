"""What the routes need at run time, created with the app and filled in by the lifespan once the model is up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.admission import ImageWork
from app.batcher import Batcher
from app.model import ServedModel
from app.settings import Settings
from app.shutdown import Drain


@dataclass
class Service:
    settings: Settings
    drain: Drain = field(default_factory=Drain)
    model: ServedModel | None = None  # set once loaded and warmed up
    batcher: Batcher | None = None
    images: ImageWork | None = None  # the threads and pixel budget of decoding and rendering

    @property
    def readiness(self) -> Literal["ready", "loading", "draining", "failed"]:
        if self.batcher is not None and self.batcher.stopped:
            return "failed"  # the inference worker has stopped: the process is on its way out
        if self.drain.draining:
            return "draining"
        if self.model is None or self.batcher is None:
            return "loading"
        return "ready"
