"""Where the service's CPU time goes under load: py-spy samples every process of `python -m app` (the one process,
or the model owner and each front with HTTP_WORKERS >= 1) while `wrk` sends /similarity requests from 32
connections, and the samples are summed by process role and by what they were doing.

Run from the repository root: `.venv/bin/python -m bench.profile_service [--model DIR] [--http-workers N]` (needs
the `bench` extra, for py-spy, and root or ptrace permission; and Debian's `wrk`). The service runs on the model
given (by default the bundled one; `python -m bench.light_model` makes one that costs almost nothing, so that the
serving alone shows) with its default settings but HTTP_WORKERS, and COMPILE=auto only when the model's compiled
package is already in the cache. The load is bench/fronts_bench.py's: one fixed pair of 640 x 480 JPEGs, every
answer a 2xx. py-spy samples every thread that is running (not waiting) RATE_HZ times a second, in every process
of the tree (`--subprocesses`). A sample's category: the first of WHOLE_STACK_CATEGORIES with a marker anywhere in
its stack (their own insides, e.g. the JSON encoder a log line runs, count as theirs), else the category of its
innermost frame with a marker in INNERMOST_CATEGORIES. The raw stacks are written to --raw (PROFILE_FILE) for a
closer look. py-spy counts a thread that is runnable but waiting for a core as running: on a busy machine the
milliseconds below exceed the CPU time /proc gives (bench/fronts_bench.py prints that); read the shares.

With `--gil`, py-spy samples only the thread that holds the interpreter's lock: the Python side of the work (the
frameworks, middleware, logging, IPC), without blocked system calls, and without the decoding and the model's
kernels, which run with the lock released.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.fronts_bench import (
    WARMUP_S, Request, compile_setting, load_average, running, siamcam_command, siamcam_env, wrk, wrk_command,
)
from bench.service_bench import DEFAULT_MODEL_DIR
from deploy.local_cluster import free_port

CONNECTIONS = 32
LOAD_S = 15
RATE_HZ = 100
PROFILE_FILE = Path("/tmp/siamcam-profile.txt")
PY_SPY = Path(sys.executable).parent / "py-spy"  # installed into the same environment by the bench extra
WHOLE_STACK_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model (TorchScript forward)", ("score_batch", "torch/jit", "app/model.py")),
    ("logging", ("logging/", "app/logs.py", "pythonjsonlogger")),
    ("metrics (prometheus_client)", ("prometheus_client", "app/metrics.py")),
    ("resizing to the model's input (contract/resize.py, or torchvision)", ("contract/resize.py", "resize_to",
                                                                            "torchvision")),
    ("decoding (Pillow's draft decode, OpenCV)", ("contract/images.py", "contract/picture.py",
                                                  "contract/preprocess.py", "PIL/", "cv2")),
    ("multipart parsing", ("multipart", "formparsers.py")),
    ("IPC with the model owner (app/ipc.py, owner client and server)", ("app/ipc.py", "app/owner_client.py",
                                                                        "app/owner_server.py", "shared_memory")),
]
INNERMOST_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("JSON and pydantic (request and response)", ("json", "pydantic")),
    ("middleware (app/middleware.py, security, rate limits, headers, CORS)", (
        "app/middleware.py", "app/security.py", "app/ratelimit.py", "app/headers.py", "middleware/cors.py",
        "app/admission.py")),
    ("route handlers (app/routes.py, app/inference.py)", ("app/routes.py", "app/inference.py")),
    ("FastAPI and Starlette routing, dependencies, responses", ("fastapi/", "starlette/")),
    ("HTTP protocol (uvicorn, h11/httptools)", ("uvicorn/", "h11", "httptools")),
    ("batcher and queue", ("app/batcher.py", "app/jobs.py")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
    ("thread pool handoff", ("concurrent/futures", "threading.py")),
]
PROCESS_FRAME = re.compile(r'^process (\d+):"(.*)"$', re.DOTALL)


def category(frames: list[str]) -> str:
    for name, markers in WHOLE_STACK_CATEGORIES:
        if any(marker in frame for frame in frames for marker in markers):
            return name
    for frame in reversed(frames):
        for name, markers in INNERMOST_CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def role(process_frames: list[tuple[int, str]], main_pid: int) -> str:
    """'main' (the model owner, or the one process), 'front PID' or 'other PID' of the sample's own process."""
    pid, command = process_frames[-1]
    if pid == main_pid:
        return "main"
    return f"{'front' if 'uvicorn' in command else 'other'} {pid}"


def read_samples(path: Path, main_pid: int) -> Counter[tuple[str, str]]:
    """Sample counts by (process role, category) from py-spy's raw output of a `--subprocesses` recording."""
    samples: Counter[tuple[str, str]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        processes = [(int(found[1]), found[2]) for part in parts if (found := PROCESS_FRAME.match(part))]
        frames = [part for part in parts if not PROCESS_FRAME.match(part)]
        if processes:
            samples[(role(processes, main_pid), category(frames))] += int(count)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="a model folder (manifest.json, "
                        "model.pt); `python -m bench.light_model` makes one that costs almost nothing")
    parser.add_argument("--http-workers", type=int, default=0, help="HTTP_WORKERS of the service profiled")
    parser.add_argument("--seconds", type=float, default=LOAD_S, help="seconds of sampled load")
    parser.add_argument("--raw", type=Path, default=PROFILE_FILE, help="where py-spy's raw stacks are written")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (Python's "
                        "own work)")
    args = parser.parse_args()
    model_dir = args.model.resolve()
    env = siamcam_env(model_dir, args.http_workers, {"COMPILE": compile_setting(model_dir)})
    with tempfile.TemporaryDirectory(prefix="profile-") as folder:
        request = Request.write(Path(folder))
        port = free_port()
        with running("siamcam", siamcam_command(port), port, env, Path(folder) / "siamcam.log") as server:
            url = f"{server.replica.url}/similarity"
            request.post(url)
            wrk(wrk_command(url, request, CONNECTIONS, WARMUP_S))
            print(f"{load_average()} before the load; server: {server.describe()}")
            spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(server.pid), "--subprocesses", "--rate",
                                    str(RATE_HZ), "--format", "raw", "--output", str(args.raw), "--nonblocking",
                                    *(["--gil"] if args.gil else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)  # py-spy attaches to every process
            command = wrk_command(url, request, CONNECTIONS, args.seconds)
            requests, wall_s, p50_ms, _ = wrk(command)
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(timeout=60)
            print(f"{load_average()} after the load; load: {' '.join(command)}")
            main_pid = server.pid
    samples = read_samples(args.raw, main_pid)
    total = sum(samples.values())
    print(f"{requests} requests at {CONNECTIONS} connections: {requests / wall_s:.1f} pairs/s, p50 {p50_ms:.1f} ms; "
          f"{total} samples at {RATE_HZ} Hz of {'threads holding the GIL' if args.gil else 'running Python threads'}"
          " (py-spy sees no OpenMP worker threads) = "
          f"{total / RATE_HZ / wall_s:.2f} cores busy on average")
    roles = Counter[str]()  # main, front (all fronts together), other
    for (process, _), count in samples.items():
        roles[process.split()[0]] += count
    for process_role, role_total in roles.most_common():
        print(f"\n{process_role} process{'es' if process_role != 'main' else ''}: {role_total} samples, "
              f"{role_total / RATE_HZ / requests * 1000:.2f} ms of CPU per request")
        by_category = Counter[str]()
        for (process, name), count in samples.items():
            if process.split()[0] == process_role:
                by_category[name] += count
        for name, count in by_category.most_common():
            print(f"  {name:<72} {100 * count / role_total:5.1f} %  ({count / RATE_HZ / requests * 1000:5.2f} ms "
                  "per request)")
    print(f"raw stacks: {args.raw}")


if __name__ == "__main__":
    main()
