"""`python -m app [uvicorn options]`: the service as the container runs it. HTTP_WORKERS=0: one uvicorn process
does everything (`uvicorn app.main:app`, which this becomes); more: front processes beside the one process that
owns the model (app/container.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app.logs import configure_logging
from app.settings import Settings


def main(argv: Sequence[str]) -> int:
    settings = Settings()
    # numpy's BLAS resizes each picture (contract/resize.py) on an image thread: one picture is too small to share
    # among cores, and a team of BLAS threads per process would only take cores from the model's threads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # One malloc arena for the process, read by glibc when the process starts: on an arena of its own the model
    # thread maps and unmaps every block over 64 MB at each batch (docs/memory.md); app/torch_threads.py sets the
    # same for a process started otherwise, as far as threads already started allow.
    arena_unset = "MALLOC_ARENA_MAX" not in os.environ
    os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    if settings.http_workers == 0:
        os.execv(sys.executable, [sys.executable, "-m", "uvicorn", "app.main:app", *argv])
    if arena_unset:
        os.execv(sys.executable, [sys.executable, "-m", "app", *argv])
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.split(".")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    address, uvicorn_options = parser.parse_known_args(argv)
    # Before prometheus_client is imported (by app.container): every process then writes its metrics there.
    metrics_dir = Path(tempfile.mkdtemp(prefix="siamcam-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    configure_logging(settings.log_level)
    from app.container import serve

    try:
        return asyncio.run(serve(settings, address.host, address.port, uvicorn_options))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
