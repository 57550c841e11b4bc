"""Start-up, readiness and shutdown: ready only once warmed up, a clear exit for a bad model, a graceful
drain on SIGTERM, and an exit with status 1 when the model breaks, with a real uvicorn process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import TEST_MODEL_NAME, free_port
from tests.app.failing_model import BLUE, FAILING_MODEL_NAME
from tests.app.images import drawn_image, encode, pair_files
from tests.app.metrics_reader import metric_value

REPO = Path(__file__).resolve().parents[2]
PAIR = pair_files(encode(drawn_image(31), "PNG"), encode(drawn_image(32), "JPEG"))


def test_ready_only_after_the_model_is_loaded_and_warmed_up(test_settings: Callable[..., Settings]) -> None:
    async def check() -> None:
        app = create_app(test_settings())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            # Before start-up has run: alive, not ready, and inference politely refused.
            assert (await client.get("/healthz")).status_code == 200
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503 and not_ready.json() == {"status": "loading"}
            refused = await client.post("/similarity", files=PAIR)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            async with LifespanManager(app):
                assert (await client.get("/readyz")).status_code == 200
                assert (await client.post("/similarity", files=PAIR)).status_code == 200

    asyncio.run(check())


def _uvicorn(env: dict[str, str], port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _start_fails_with_one_line(model_store: Path, model_name: str, expected: str) -> None:
    process = _uvicorn({"MODEL_STORE": str(model_store), "MODEL_NAME": model_name}, free_port())
    _, stderr = process.communicate(timeout=120)
    assert process.returncode not in (0, None)
    assert "Traceback" not in stderr
    errors = [json.loads(line) for line in stderr.splitlines() if '"CRITICAL"' in line or '"ERROR"' in line]
    assert len(errors) == 1, stderr
    assert expected in errors[0]["message"]


def test_a_missing_model_stops_start_up_with_one_clear_line(model_store: Path) -> None:
    _start_fails_with_one_line(model_store, "no-such-model", "no model at")


def test_a_corrupt_model_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path) -> None:
    shutil.copytree(model_store / TEST_MODEL_NAME, tmp_path / "broken")
    with (tmp_path / "broken" / "model.pt").open("r+b") as model_file:
        model_file.seek(1000)
        model_file.write(b"\xff\xfe\xfd")
    _start_fails_with_one_line(tmp_path, "broken", "does not match its manifest")


def _wait_until(condition: Callable[[], bool], timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigterm_drains_then_exits(model_store: Path) -> None:
    in_flight = 4
    port = free_port()
    grace_s = 30
    # A long batch window keeps the accepted requests queued when SIGTERM arrives.
    process = _uvicorn({"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME,
                        "MAX_BATCH_WAIT_MS": "2000", "DRAIN_GRACE_S": str(grace_s)}, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client, \
                ThreadPoolExecutor(in_flight) as pool:
            _wait_until(lambda: client.get("/readyz").status_code == 200, 180, process)
            accepted = [pool.submit(client.post, "/explain", files=PAIR) for _ in range(in_flight)]
            _wait_until(lambda: metric_value(client, "siamcam_queue_depth", queue="explain") == in_flight,
                        10, process)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _wait_until(lambda: client.get("/readyz").status_code == 503, 2, process)
            late = client.post("/similarity", files=PAIR)
            assert late.status_code == 503 and late.headers["retry-after"]
            assert late.headers["content-type"] == "application/problem+json"
            assert [future.result().status_code for future in accepted] == [200] * in_flight
        # It exits by itself once drained: uvicorn re-raises the SIGTERM it handled, or exits with 0.
        assert process.wait(timeout=grace_s + 10) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < grace_s
        assert "drained" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_broken_model_makes_the_replica_unready_then_exit_with_status_1(failing_model_store: Path) -> None:
    """Once the inference worker stops (the model fails even on the warm-up pair), the process leaves with
    status 1, so that the orchestrator restarts it; the request that broke it is answered first."""
    port = free_port()
    process = _uvicorn({"MODEL_STORE": str(failing_model_store), "MODEL_NAME": FAILING_MODEL_NAME}, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client:
            _wait_until(lambda: client.get("/readyz").status_code == 200, 180, process)
            breaking = client.post("/similarity", files=pair_files(encode(drawn_image(33), "PNG"), BLUE))
            assert breaking.status_code == 503, breaking.text
            assert breaking.headers["content-type"] == "application/problem+json"
        assert process.wait(timeout=30) == 1
        stderr = process.stderr.read()
        critical = [json.loads(line) for line in stderr.splitlines() if '"CRITICAL"' in line]
        assert len(critical) == 1, stderr
        assert "inference worker stopped" in critical[0]["message"]
        assert "saw a blue image" in critical[0]["exc_info"]  # why, for the operator
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
