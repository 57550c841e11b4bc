"""Prometheus metrics, all prefixed `siamcam_`, served at GET /metrics.

With several processes (HTTP_WORKERS > 0, app/container.py), each writes its values into files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and /metrics sums every process's: the container
is one target. Gauges then add up the live processes' values."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("siamcam_requests_total", "HTTP requests answered", ["route", "method", "status"])
REQUEST_LATENCY = Histogram(
    "siamcam_request_duration_seconds", "Time to answer an HTTP request", ["route"], buckets=_LATENCY_BUCKETS
)
REQUESTS_IN_PROGRESS = Gauge(
    "siamcam_inference_requests_in_progress",
    "Inference requests (/similarity, /explain, /embed, /rank) admitted and not yet answered: what a drain waits for",
    ["route"], multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge("siamcam_queue_depth",
                    "Jobs (pairs; single images in the embed queue) waiting in a queue for the inference worker",
                    ["queue"], multiprocess_mode="livesum")
QUEUE_WAIT = Histogram(
    "siamcam_queue_wait_seconds", "Time a job waited before its batch started", ["queue"], buckets=_LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "siamcam_batch_size", "Jobs (pairs, or images) per batch run by the inference worker", ["queue"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFERENCE_TIME = Histogram(
    "siamcam_inference_seconds", "Model time per batch", ["queue"], buckets=_LATENCY_BUCKETS
)
REJECTIONS = Counter(
    "siamcam_rejections_total",
    "Requests refused or abandoned: queue_full, decode_budget, draining, timeout, disconnected, worker_stopped",
    ["reason"],
)
DECODE_PIXELS_IN_FLIGHT = Gauge(
    "siamcam_decode_pixels_in_flight", "Header pixels of the images being decoded now (MAX_DECODE_PIXELS_IN_FLIGHT)",
    multiprocess_mode="livesum",
)
DECODE_PIXELS_ADMITTED = Counter(
    "siamcam_decode_pixels_admitted_total", "Header pixels of the images admitted for decoding"
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "siamcam_rate_limit_store_errors_total",
    "Calls to the rate-limit store (RATE_LIMIT_STORAGE) that failed; requests then go unlimited",
)


def exposition() -> bytes:
    """Every metric in the text format: this process's, or with several processes, all of theirs summed."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
