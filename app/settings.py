"""Service settings, read from environment variables (or a `.env` file) by pydantic-settings."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODEL_STORE = Path(__file__).resolve().parents[1] / "model_store"


class Settings(BaseSettings):
    """Every knob of the service; the README's "Service" section lists them with their defaults."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_name: str = Field("flowers", description="folder of the model to serve, inside MODEL_STORE")
    model_store: Path = Field(REPO_MODEL_STORE, description="folder holding the models")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto picks CUDA when it is available"
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="most pairs run together in one batch")
    max_batch_wait_ms: float = Field(
        5.0, ge=0, description="how long the first pair of a batch waits for others to join it"
    )
    queue_capacity: int = Field(128, ge=1, description="pairs each queue holds before answering 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still waiting after this gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted file per image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted image (width x height)")
    max_overlay_side: int = Field(2048, ge=16, description="cap on the `max_side` option of /explain")
    drain_grace_s: float = Field(
        30.0, ge=0, description="after SIGTERM, how long accepted requests may still take before exit"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @cached_property
    def model_dir(self) -> Path:
        return self.model_store / self.model_name

    @property
    def max_body_bytes(self) -> int:
        """Two images plus room for the form fields and multipart framing."""
        return 2 * self.max_upload_bytes + 64 * 1024
