"""Start-up, readiness and shutdown: ready only once warmed up, a clear exit for a bad model, a graceful
drain on SIGTERM, and an exit with status 1 when the model breaks, with a real uvicorn process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from torch import nn

from app.main import create_app
from app.settings import Settings
from deploy.local_cluster import Replica
from tests.app.busy_model import model_kept_busy
from tests.app.conftest import TEST_MODEL_NAME
from tests.app.failing_model import BLUE, FAILING_MODEL_NAME
from tests.support.images import drawn_image, encode, pair_files
from tests.support.metrics import metric_value
from tests.support.model_folders import copy_of_model, with_module
from tests.support.service import running_service

PAIR = pair_files(encode(drawn_image(31), "PNG"), encode(drawn_image(32), "JPEG"))


def test_ready_only_after_the_model_is_loaded_and_warmed_up(test_settings: Callable[..., Settings]) -> None:
    async def check() -> None:
        app = create_app(test_settings(retry_after_s=5))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            # Before start-up has run: alive, not ready, and inference politely refused.
            assert (await client.get("/healthz")).status_code == 200
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503 and not_ready.json() == {"status": "loading"}
            refused = await client.post("/similarity", files=PAIR)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"  # RETRY_AFTER_S
            async with LifespanManager(app):
                assert (await client.get("/readyz")).status_code == 200
                assert (await client.post("/similarity", files=PAIR)).status_code == 200

    asyncio.run(check())


def _start_fails_with_one_line(model_store: Path, model_name: str, expected: str, log_path: Path,
                               **settings: str) -> None:
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": model_name, **settings}
    with running_service(env, log_path, wait_ready=False) as replica:
        replica.process.wait(timeout=120)
    assert replica.process.returncode == 1
    log = log_path.read_text()
    assert "Traceback" not in log
    errors = [json.loads(line) for line in log.splitlines() if '"CRITICAL"' in line or '"ERROR"' in line]
    assert len(errors) == 1, log
    assert expected in errors[0]["message"]


def test_a_missing_model_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path) -> None:
    _start_fails_with_one_line(model_store, "no-such-model", "no model at", tmp_path / "uvicorn.log")


def test_decoding_on_a_gpu_without_one_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path) -> None:
    """Not a service that would send every JPEG to a GPU it does not have."""
    _start_fails_with_one_line(model_store, TEST_MODEL_NAME, "DECODE_DEVICE=cuda decodes JPEG uploads on the model's "
                               "GPU, but the model runs on cpu", tmp_path / "uvicorn.log", DEVICE="cpu",
                               DECODE_DEVICE="cuda")


def test_a_corrupt_model_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path) -> None:
    copy_of_model(model_store / TEST_MODEL_NAME, tmp_path / "broken")
    with (tmp_path / "broken" / "model.pt").open("r+b") as model_file:
        model_file.seek(1000)
        model_file.write(b"\xff\xfe\xfd")
    _start_fails_with_one_line(tmp_path, "broken", "does not match its manifest", tmp_path / "uvicorn.log")


def test_a_manifest_without_a_required_field_stops_start_up_with_one_clear_line(model_store: Path,
                                                                               tmp_path: Path) -> None:
    copy_of_model(model_store / TEST_MODEL_NAME, tmp_path / "no-normalization", normalization=None)
    copy_of_model(model_store / TEST_MODEL_NAME, tmp_path / "bad-size", input_size=[0, 128])
    _start_fails_with_one_line(tmp_path, "no-normalization", "manifest.json is not a valid manifest (normalization: "
                               "Field required)", tmp_path / "first.log")
    _start_fails_with_one_line(tmp_path, "bad-size", "input_size.0: Input should be greater than 0",
                               tmp_path / "second.log")


class _OnlyForward(nn.Module):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return (x1 * x2).mean(dim=(1, 2, 3))


class _FailsOnEveryBatch(_OnlyForward):
    """Every contract method, but `features` fails: the warm-up must refuse it."""

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot compute features")

    @torch.jit.export
    def embed(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return feature_maps.flatten(1)

    @torch.jit.export
    def similarity(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((e1 * e2).sum(dim=1))


def test_a_model_without_a_contract_method_stops_start_up_with_one_clear_line(model_store: Path,
                                                                              tmp_path: Path) -> None:
    # these modules have format version 1\'s four methods only
    with_module(model_store / TEST_MODEL_NAME, tmp_path / "forward-only", _OnlyForward(), format_version=1)
    _start_fails_with_one_line(tmp_path, "forward-only", "model.pt lacks the contract method(s) features, embed, "
                               "similarity", tmp_path / "uvicorn.log")


def test_a_model_failing_its_warm_up_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path,
                                                                        layout: dict[str, str]) -> None:
    """With fronts, they wait for a model that will never come: the main process must end them, and say why
    once."""
    # these modules have format version 1\'s four methods only
    with_module(model_store / TEST_MODEL_NAME, tmp_path / "failing", _FailsOnEveryBatch(), format_version=1)
    _start_fails_with_one_line(tmp_path, "failing", f"{tmp_path / 'failing' / 'model.pt'} failed its warm-up batch",
                               tmp_path / "uvicorn.log", **layout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: DEVICE=cuda would start")
def test_device_cuda_without_a_gpu_stops_start_up_with_one_clear_line(model_store: Path, tmp_path: Path) -> None:
    """Catches a DEVICE=cuda that falls back to the CPU in silence (a GPU replica that quietly runs 10x slower)."""
    _start_fails_with_one_line(model_store, TEST_MODEL_NAME, "DEVICE=cuda but no CUDA device is visible",
                               tmp_path / "uvicorn.log", DEVICE="cuda")


def _wait_until(condition: Callable[[], bool], timeout_s: float, replica: Replica) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert replica.process.poll() is None, replica.log_tail(40)
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigterm_drains_then_exits(failing_model_store: Path, tmp_path: Path, layout: dict[str, str]) -> None:
    """With fronts, SIGTERM reaches the main process, which must drain every front before the model leaves."""
    in_flight = 4
    grace_s = 30
    env = {"MODEL_STORE": str(failing_model_store), "MODEL_NAME": FAILING_MODEL_NAME, "DRAIN_GRACE_S": str(grace_s),
           **layout}
    with running_service(env, tmp_path / "uvicorn.log") as replica, \
            httpx.Client(base_url=replica.url, timeout=60, trust_env=False) as client, \
            ThreadPoolExecutor(in_flight) as pool:
        # Queued behind a busy model, the accepted requests are still waiting when SIGTERM arrives.
        with model_kept_busy(client) as still_busy:
            accepted = [pool.submit(client.post, "/similarity", files=PAIR) for _ in range(in_flight)]
            _wait_until(lambda: metric_value(client, "siamcam_queue_depth", queue="similarity") == in_flight, 10,
                        replica)
            signalled = time.monotonic()
            replica.process.send_signal(signal.SIGTERM)
            _wait_until(lambda: client.get("/readyz").status_code == 503, 2, replica)
            late = client.post("/similarity", files=PAIR)
            assert still_busy(), "the busy batch ended before the drain was checked"
        assert late.status_code == 503 and late.headers["retry-after"]
        assert late.headers["content-type"] == "application/problem+json"
        assert [future.result().status_code for future in accepted] == [200] * in_flight
        # It exits by itself once drained: uvicorn re-raises the SIGTERM it handled, or exits with 0.
        assert replica.process.wait(timeout=grace_s + 10) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < grace_s
        assert "drained" in replica.log_path.read_text()


def test_a_broken_model_makes_the_replica_unready_then_exit_with_status_1(failing_model_store: Path,
                                                                          tmp_path: Path, layout: dict[str, str]) -> None:
    """Once the inference worker stops (the model fails even on the warm-up pair), the process leaves with
    status 1, so that the orchestrator restarts it; the request that broke it is answered first (with fronts: the
    main process too, after its fronts have answered)."""
    env = {"MODEL_STORE": str(failing_model_store), "MODEL_NAME": FAILING_MODEL_NAME, **layout}
    with running_service(env, tmp_path / "uvicorn.log") as replica, \
            httpx.Client(base_url=replica.url, timeout=60, trust_env=False) as client:
        breaking = client.post("/similarity", files=pair_files(encode(drawn_image(33), "PNG"), BLUE))
        assert breaking.status_code == 503, breaking.text
        assert breaking.headers["content-type"] == "application/problem+json"
        assert replica.process.wait(timeout=30) == 1
    log = replica.log_path.read_text()
    critical = [json.loads(line) for line in log.splitlines() if '"CRITICAL"' in line]
    assert len(critical) == 1, log
    assert "inference worker stopped" in critical[0]["message"]
    assert "saw a blue image" in critical[0]["exc_info"]  # why, for the operator
