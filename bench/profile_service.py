"""Where the service's CPU time goes under load: py-spy samples `uvicorn app.main:app` while 32 clients send
/similarity requests, and the samples are summed by what they were doing.

Run from the repository root: `.venv/bin/python -m bench.profile_service` (needs the `bench` extra, for py-spy,
and root or ptrace permission). The service runs with its default settings on the default model (started by
tests/support/service.py); the load is deploy/load.py's clients, every answer checked. py-spy samples every
thread that is running (not waiting) RATE_HZ times a second; each sample is put in the first category whose
marker appears in its stack, from the innermost frame out, so a sample in the model's forward pass counts as
"model" whichever thread ran it. The raw stacks are written to PROFILE_FILE for a closer look.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.peers import load_average
from bench.service_bench import load_pairs, served_model_option, service_environment
from deploy.load import make_jobs, reference_scores, run_load
from tests.support.service import running_service

CLIENTS = 32
PAIR_COUNT = 32
WARMUP_REQUESTS = 64
REQUESTS = 480  # about 20 s of load at the service's pace here
RATE_HZ = 100
PROFILE_FILE = Path("/tmp/siamcam-profile.txt")
PY_SPY = Path(sys.executable).parent / "py-spy"  # installed into the same environment by the bench extra
# (category, markers): a sample belongs to the category of its innermost frame that contains a marker (the first
# listed category, when one frame matches several).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model (TorchScript forward)", ("score_batch", "torch/jit")),
    ("decoding and resizing (Pillow, torchvision)", ("contract/images.py", "contract/preprocess.py", "PIL/")),
    ("multipart parsing", ("multipart", "formparsers.py")),
    ("middleware", ("app/middleware.py", "app/security.py", "app/ratelimit.py", "app/headers.py")),
    ("metrics and logging", ("prometheus_client", "logging/", "app/logs.py")),
    ("HTTP protocol (uvicorn, h11/httptools)", ("uvicorn/protocols", "h11", "httptools")),
    ("response (FastAPI, pydantic, JSON)", ("fastapi/routing.py", "pydantic", "json")),
    ("batcher and queue", ("app/batcher.py", "app/inference.py")),
    ("asyncio event loop", ("asyncio/",)),
    ("thread pool handoff", ("concurrent/futures", "threading.py")),
]


def category(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


async def _no_progress(done: int) -> None:
    """run_load reports each answer; the profile only needs the load."""


def main() -> None:
    model_dir = served_model_option(__doc__.splitlines()[0])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pairs = load_pairs(PAIR_COUNT)
    with tempfile.TemporaryDirectory(prefix="profile-") as logs, \
            running_service(service_environment(model_dir), Path(logs) / "siamcam.log") as service:
        expected = reference_scores(service.url, pairs)
        asyncio.run(run_load(service.url, make_jobs(WARMUP_REQUESTS, 0, PAIR_COUNT), pairs, expected, CLIENTS,
                             _no_progress))
        print(f"{load_average()} before the load")
        spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(service.process.pid), "--rate", str(RATE_HZ),
                                "--format", "raw", "--output", str(PROFILE_FILE), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # py-spy attaches
        started = time.perf_counter()
        outcomes = asyncio.run(run_load(service.url, make_jobs(REQUESTS, 0, PAIR_COUNT), pairs, expected,
                                        CLIENTS, _no_progress))
        wall_s = time.perf_counter() - started
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(timeout=60)
        print(f"{load_average()} after the load")
    wrong = [outcome.problem for outcome in outcomes if outcome.problem]
    if wrong:
        raise RuntimeError(f"{len(wrong)} wrong answers, e.g. {wrong[0]}")
    samples: Counter[str] = Counter()
    for line in PROFILE_FILE.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples[category(stack)] += int(count)
    total = sum(samples.values())
    print(f"{len(outcomes)} requests at {CLIENTS} clients: {len(outcomes) / wall_s:.1f} pairs/s; "
          f"{total} samples at {RATE_HZ} Hz of running threads = {total / RATE_HZ / wall_s:.2f} cores busy "
          f"in the service on average")
    for name, count in samples.most_common():
        print(f"  {name:<46} {100 * count / total:5.1f} %  ({count / RATE_HZ / len(outcomes) * 1000:6.1f} ms "
              "of CPU per request)")
    print(f"raw stacks: {PROFILE_FILE}")


if __name__ == "__main__":
    main()
