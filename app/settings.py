"""Service settings, read from environment variables (or a `.env` file) by pydantic-settings."""

from __future__ import annotations

import math
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.cache import default_cache_dir
from contract.precision import Precision

REPO_MODEL_STORE = Path(__file__).resolve().parents[1] / "model_store"
# The stores RATE_LIMIT_STORAGE may name (app/ratelimit.py): one process's memory, or Redis in its forms.
MEMORY_SCHEMES = ("memory",)
REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on, fewer where its cgroup's CPU quota (a container's
    `--cpus`, a pod's CPU limit) allows less time than that."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus  # no cgroup v2 CPU controller here: no quota
    return cpus if quota == "max" else max(1, min(cpus, math.ceil(int(quota) / int(period))))


def default_http_workers(cpus: int) -> int:
    """HTTP_WORKERS's default for `cpus` CPUs: none on up to 2, else one front per CPU but the one the model's
    process needs, at most 8 (enough to keep one model busy on a GPU; the GPU overlays set 8). On the 2-core
    machine two runs with the default model disagreed: one front served 1.12x-1.25x one process's pairs/s in one,
    0.72x at one connection and 0.84x at eight in the other, its p50 1.28x (bench/RESULTS.md, "Front processes");
    one process is the safe choice there until a quiet machine settles it."""
    return 0 if cpus <= 2 else min(cpus - 1, 8)


class Settings(BaseSettings):
    """Every knob of the service; docs/settings.md lists them with their defaults."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_name: str = Field("flowers", description="folder of the model to serve, inside MODEL_STORE")
    model_store: Path = Field(REPO_MODEL_STORE, description="folder holding the models")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto picks CUDA when it is available"
    )
    compile: Literal["auto", "off"] = Field(
        "auto", description="auto: the backbone compiled for this machine (compiled at start-up when COMPILE_CACHE_DIR "
        "lacks it) where it scores as model.pt does, else TorchScript; off: TorchScript only"
    )
    precision: Precision = Field(
        "fp32", description="what the backbone computes in: fp32 (exact, batch-invariant scores), or bf16 or fp16 "
        "(autocast; the head, explanations and contributions stay fp32)"
    )
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where JPEG uploads become the model's pictures: cpu (Pillow, on the image threads of "
        "the HTTP processes), or cuda (whole files sent to the model's process and decoded on its GPU a batch at a "
        "time, app/device_decode.py; needs the model on a GPU; other formats, and /explain's overlays, stay on "
        "the CPU)"
    )
    compile_cache_dir: Path = Field(
        default_factory=default_cache_dir, description="folder of compiled backbones (`python -m training compile`)"
    )
    http_workers: int = Field(
        default_factory=lambda: default_http_workers(usable_cpus()), ge=0, le=64,
        description="front processes that serve HTTP beside one model-owning process (`python -m app`, "
        "docs/how-a-request-runs.md); 0: one process does everything. Default: 0 on up to 2 CPUs, else one per CPU "
        "but the model's, at most 8",
    )
    # Set by app/container.py for each front process it starts: not user settings.
    owner_socket: Path | None = Field(None, description="internal: the model owner's socket, in a front process")
    front_index: int = Field(0, ge=0, description="internal: which front process this is, from 0")
    pixel_counters_fd: int | None = Field(
        None, description="internal: the fronts' shared MAX_DECODE_PIXELS_IN_FLIGHT counters (app/admission.py)"
    )
    # 8 on a CPU: on a 2-core CPU the default model served 45.5 pairs/s at 32 clients with batches of up to 8 and
    # 26.0 with up to 16 (`python -m bench.service_bench`, bench/RESULTS.md, "Peers"). 32 on a GPU: on an H200 the
    # model scored 242 pairs/s at batch 8 and 300 at batch 32 (bench/RESULTS.md, "On a GPU").
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description="most pairs run together in one batch; default 8 on a CPU, 32 on a GPU"
    )
    max_batch_wait_ms: float = Field(
        5.0, ge=0, description="how long a partial batch may be passed over for full batches of the other queue"
    )
    queue_capacity: int = Field(128, ge=1, description="pairs each queue holds before answering 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still waiting after this gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted file per image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted image (width x height)")
    # Two pairs of the largest images (docs/settings.md): while one pair's decoding ends, the next one's starts.
    max_decode_pixels_in_flight: int = Field(
        160_000_000, ge=1, description="header pixels (width x height) of the images being decoded at once"
    )
    admission_wait_s: float = Field(
        1.0, ge=0, description="how long a request may wait for MAX_DECODE_PIXELS_IN_FLIGHT before its 503"
    )
    # 1 on a GPU: with a nearly free model on the CPU (the GPU's case: the work around the model is what costs),
    # the model thread's OpenMP team of 2 waited for the cores the fronts decoded on; with 1 thread, two fronts
    # served 1.4x the pairs/s at 0.6x the CPU per request (bench/RESULTS.md, "Front processes").
    model_threads: int | None = Field(
        None, ge=1, le=256, description="torch threads the model runs on; default: torch's own choice (the "
        "physical cores) on a CPU, 1 on a GPU, which does the model's work"
    )
    image_workers: int = Field(
        default_factory=usable_cpus, ge=1,
        description="threads that decode uploads and render overlays (default: the CPUs this process may use)",
    )
    max_overlay_side: int = Field(2048, ge=16, description="cap on the `max_side` option of /explain and /rank")
    max_embed_images: int = Field(32, ge=1, le=256, description="most images one /embed request may send")
    max_rank_candidates: int = Field(64, ge=1, le=256, description="most candidates one /rank request may send")
    drain_grace_s: float = Field(
        30.0, ge=0, description="after SIGTERM, how long accepted requests may still take before exit"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Access control (docs/security.md): all off by default, so that a local `make serve` stays open.
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated API keys; when set (or API_KEYS_FILE), the API needs one"
    )
    api_keys_file: Path | None = Field(
        None, description="file of API keys, one a line: the key itself, or `id:sha256-hex-of-the-key`"
    )
    metrics_token: SecretStr = Field(SecretStr(""), description="when set, /metrics needs it as a Bearer token")
    rate_limit_per_s: float | None = Field(
        None, gt=0, description="requests per second each key (or client address) may make; unset: no limit"
    )
    rate_limit_burst: int | None = Field(
        None, ge=1, description="requests a key may make at once; default: one second's worth (at least 1)"
    )
    rate_limit_storage: str = Field(
        "memory://", description="where the rate limits count: memory:// (this process) or redis://host:port[/db] "
        "(shared by every replica)"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins (scheme://host[:port]) whose pages may call the API"
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _storage_is_supported(cls, value: str) -> str:
        if urlsplit(value).scheme not in (*MEMORY_SCHEMES, *REDIS_SCHEMES):
            raise ValueError(f"RATE_LIMIT_STORAGE {value!r} is not a store siamcam can use: write memory:// (one "
                             "process) or redis://host:port[/db] (also rediss://, redis+unix://, redis+sentinel://, "
                             "redis+cluster://)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_exact(cls, value: str) -> str:
        for origin in _split(value):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"CORS_ORIGINS entry {origin!r} is not an origin: write scheme://host[:port], "
                                 "without a path or a trailing slash, e.g. https://app.example.com")
        return value

    @cached_property
    def model_dir(self) -> Path:
        return self.model_store / self.model_name

    @property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    @property
    def api_key_list(self) -> list[str]:
        return _split(self.api_keys.get_secret_value())

    @property
    def rate_limit_bucket_size(self) -> int:
        """RATE_LIMIT_BURST, or one second's worth of RATE_LIMIT_PER_S (at least one request)."""
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_s or 1))

    @property
    def rate_limit_window_s(self) -> int:
        """The window in which a key may make RATE_LIMIT_BURST requests: the burst's worth of RATE_LIMIT_PER_S,
        in whole seconds (the store counts in seconds), at least one."""
        return max(1, round(self.rate_limit_bucket_size / (self.rate_limit_per_s or 1)))

    def batch_size_on(self, device_type: str) -> int:
        """MAX_BATCH_SIZE, or its default for the device the model runs on ("cpu", "cuda")."""
        return self.max_batch_size or (32 if device_type == "cuda" else 8)

    @property
    def rate_limit_counts_in_memory(self) -> bool:
        """Whether RATE_LIMIT_STORAGE is one process's memory (memory://), not a store every process shares."""
        return urlsplit(self.rate_limit_storage).scheme in MEMORY_SCHEMES

    @property
    def max_body_bytes(self) -> int:
        """Two images plus room for the form fields and multipart framing."""
        return self.max_body_bytes_for(2)

    def max_body_bytes_for(self, images: int) -> int:
        """`images` files of MAX_UPLOAD_BYTES plus room for the form fields and the multipart framing."""
        return images * self.max_upload_bytes + 64 * 1024

    @property
    def embed_queue_capacity(self) -> int:
        """Images the embed queue holds: as many pictures as a pair queue (2 x QUEUE_CAPACITY), and never fewer
        than one /embed or /rank request sends, which would otherwise be refused with 503 forever."""
        return max(2 * self.queue_capacity, self.max_embed_images, 1 + self.max_rank_candidates)

    @property
    def max_body_bytes_by_path(self) -> dict[str, int]:
        """The largest body each inference endpoint accepts: as many images as it takes."""
        return {"/similarity": self.max_body_bytes, "/explain": self.max_body_bytes,
                "/embed": self.max_body_bytes_for(self.max_embed_images),
                "/rank": self.max_body_bytes_for(1 + self.max_rank_candidates)}


def _split(comma_separated: str) -> list[str]:
    return [item.strip() for item in comma_separated.split(",") if item.strip()]
