"""What the routes need at run time, created with the app and filled in by the lifespan once the model is up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.admission import ImageWork
from app.jobs import Inference
from app.model_view import ModelView
from app.settings import Settings
from app.shutdown import Drain


@dataclass
class Service:
    settings: Settings
    drain: Drain = field(default_factory=Drain)
    model: ModelView | None = None  # set once loaded and warmed up
    inference: Inference | None = None  # the model's owner: in this process, or the container's main process
    images: ImageWork | None = None  # the threads and pixel budget of decoding and rendering

    @property
    def readiness(self) -> Literal["ready", "loading", "draining", "failed"]:
        if self.inference is not None and self.inference.stopped:
            return "failed"  # the inference worker has stopped: the process is on its way out
        if self.drain.draining:
            return "draining"
        if self.model is None or self.inference is None:
            return "loading"
        return "ready"
