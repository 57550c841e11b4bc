"""Front processes beside one model owner (`python -m app` with HTTP_WORKERS > 0, app/container.py), started as
the container starts them: the same answers as one process, batches formed from every front's requests, one
service to operate (metrics, rate limits, a dead front, a dead owner, a front that cannot start)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from deploy.local_cluster import Replica
from tests.app.conftest import TEST_MODEL_NAME
from tests.conftest import DECISIONS, drawn_pair
from tests.support.images import class_image, encode
from tests.support.metrics import metric_value
from tests.support.service import running_service
from tests.support.waiting import wait_for

FRONTS = 2


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is `pid`, from /proc."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command may hold spaces and parentheses: the fields after its closing one are fixed.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone meanwhile
            if int(fields[1]) == pid:
                children.add(int(entry.name))
    return children


def fronts_of(replica: Replica) -> set[int]:
    return child_pids(replica.process.pid)


@pytest.fixture(scope="module")
def fronts(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """One container's processes: FRONTS fronts and the model owner, serving the suite's `tiny` model."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": str(FRONTS)}
    with running_service(env, tmp_path_factory.mktemp("fronts") / "service.log") as replica:
        yield replica


def fresh_connection_post(url: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a connection of its own: the kernel hands each new connection to any front."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        return http.post(path, **kwargs)


def test_fronts_answer_exactly_as_one_process_does(fronts: Replica, client: httpx.Client, tmp_path: Path) -> None:
    """Catches any change to what crosses between the processes: a picture, a score, a heatmap, a contribution
    or an embedding that is rounded, reordered, transposed or read from the wrong slot."""
    pairs = [drawn_pair(decision, tmp_path / decision) for decision in DECISIONS]
    options = {"include_heatmaps": "true", "format": "png", "max_side": 64}
    with httpx.Client(base_url=fronts.url, timeout=60, trust_env=False) as remote:
        for pair in pairs:
            for path, data in (("/similarity", {}), ("/explain", options),
                               ("/explain", {**options, "method": "contributions", "include_correspondence": "true"})):
                here, there = client.post(path, files=pair.files, data=data), remote.post(path, files=pair.files,
                                                                                          data=data)
                assert here.status_code == there.status_code == 200, there.text
                assert there.json()["similar"] is pair.similar
                for field in ("score", "similar", "explanations", "contributions"):
                    assert there.json().get(field) == here.json().get(field), (path, data, field)
        images = [("images", (f"{index}.png", encode(class_image(colour, index), "PNG"), "image/png"))
                  for index, colour in enumerate(("red", "blue", "green", "red"))]
        here, there = client.post("/embed", files=images), remote.post("/embed", files=images)
        assert there.status_code == 200, there.text
        assert there.json()["embeddings"] == here.json()["embeddings"]
        ranked = [("query", images[0][1]), *(("candidates", image[1]) for image in images[1:])]
        here, there = client.post("/rank", files=ranked), remote.post("/rank", files=ranked)
        assert there.status_code == 200, there.text
        assert [(c["index"], c["score"]) for c in there.json()["candidates"]] == \
               [(c["index"], c["score"]) for c in here.json()["candidates"]]
        assert remote.get("/model").json() == client.get("/model").json()


def test_pairs_from_every_front_batch_together_and_keep_their_own_results(fronts: Replica, client: httpx.Client,
                                                                          tmp_path: Path) -> None:
    """Catches a layout where each front batches alone, and answers that go to the wrong request when jobs of
    several fronts share a batch."""
    pairs = [drawn_pair(DECISIONS[seed % 2], tmp_path / str(seed), seed) for seed in range(24)]
    expected = [client.post("/similarity", files=pair.files).json()["score"] for pair in pairs]
    with httpx.Client(base_url=fronts.url, trust_env=False) as remote:
        batches_before = metric_value(remote, "siamcam_batch_size_count", queue="similarity")
        pairs_before = metric_value(remote, "siamcam_batch_size_sum", queue="similarity")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda pair: fresh_connection_post(fronts.url, "/similarity", files=pair.files),
                                pairs))
    assert [answer.status_code for answer in answers] == [200] * len(pairs)
    assert [answer.json()["score"] for answer in answers] == expected
    with httpx.Client(base_url=fronts.url, trust_env=False) as remote:
        batches = metric_value(remote, "siamcam_batch_size_count", queue="similarity") - batches_before
        batched = metric_value(remote, "siamcam_batch_size_sum", queue="similarity") - pairs_before
    assert batched == len(pairs)
    assert batches < len(pairs), "every pair ran alone: the owner never batched the fronts' pairs together"


def test_metrics_count_every_process(fronts: Replica, tmp_path: Path) -> None:
    """Catches a /metrics that shows only the front that answers it: requests served by the other front, and the
    owner's batches, must all count."""
    pair = drawn_pair("similar", tmp_path)
    with httpx.Client(base_url=fronts.url, trust_env=False) as remote:
        before = metric_value(remote, "siamcam_requests_total", route="/similarity", method="POST", status="200")
        inferences_before = metric_value(remote, "siamcam_inference_seconds_count", queue="similarity")
    for _ in range(12):
        assert fresh_connection_post(fronts.url, "/similarity", files=pair.files).status_code == 200
    for _ in range(4):  # whichever front answers, it shows the container's counts
        with httpx.Client(base_url=fronts.url, trust_env=False) as remote:
            assert metric_value(remote, "siamcam_requests_total", route="/similarity", method="POST",
                                status="200") - before == 12
            assert metric_value(remote, "siamcam_inference_seconds_count", queue="similarity") - \
                inferences_before >= 1
            assert metric_value(remote, "siamcam_queue_depth", queue="similarity") == 0


def test_front_processes_never_load_torch(fronts: Replica, tmp_path: Path) -> None:
    """Catches a front that imports torch (about 630 MB of memory each, N times over) through a module of the
    request path, even one imported only when the first request needs it."""
    pair = drawn_pair("similar", tmp_path)
    for path, data in (("/similarity", {}), ("/explain", {"method": "contributions"})):
        for _ in range(2 * FRONTS):
            assert fresh_connection_post(fronts.url, path, files=pair.files, data=data).status_code == 200
    for pid in fronts_of(fronts):
        loaded = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in loaded and "libc10" not in loaded, f"front {pid} has loaded torch"


def test_the_rate_limit_is_the_containers_not_each_fronts(model_store: Path, tmp_path: Path) -> None:
    """With limits counted in memory, each front counting for itself would let a caller through FRONTS times the
    configured rate."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": str(FRONTS),
           "RATE_LIMIT_PER_S": "0.2", "RATE_LIMIT_BURST": "6"}  # 6 requests in any 30 s
    with running_service(env, tmp_path / "service.log") as replica:
        statuses = [fresh_connection_post(replica.url, "/similarity", files={}).status_code for _ in range(20)]
    assert statuses.count(429) == 14, statuses  # the 6 others are let through, and refused for their empty form


def test_a_killed_front_is_replaced_and_the_service_keeps_answering(model_store: Path, tmp_path: Path) -> None:
    """Catches a container that loses a core's worth of serving for good, or answers errors, when a front dies."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": str(FRONTS)}
    pair = drawn_pair("dissimilar", tmp_path)
    with running_service(env, tmp_path / "service.log") as replica:
        wait_for(lambda: replica.log_path.read_text().count("Application startup complete") == FRONTS)
        first = fronts_of(replica)
        assert len(first) == FRONTS
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in fronts_of(replica) and len(fronts_of(replica)) == FRONTS)
        with httpx.Client(base_url=replica.url, trust_env=False) as remote:
            wait_for(lambda: remote.get("/readyz").status_code == 200)
        for _ in range(8):
            answer = fresh_connection_post(replica.url, "/similarity", files=pair.files)
            assert answer.status_code == 200 and answer.json()["similar"] is False
        assert replica.process.poll() is None
    assert f"front process {victim} exited" in replica.log_path.read_text()


def test_when_the_model_owner_dies_every_front_exits_at_once(model_store: Path, tmp_path: Path) -> None:
    """Catches fronts that outlive the model and answer 503 forever."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": str(FRONTS)}
    with running_service(env, tmp_path / "service.log") as replica:
        wait_for(lambda: replica.log_path.read_text().count("Application startup complete") == FRONTS)
        front_pids = fronts_of(replica)
        replica.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in front_pids),
                 timeout_s=10)
        assert time.monotonic() - killed < 5
    critical = [json.loads(line) for line in replica.log_path.read_text().splitlines() if '"CRITICAL"' in line]
    assert critical and all("inference worker stopped" in line["message"] for line in critical)
    assert all("model owner process has gone" in line["exc_info"] for line in critical)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_front_that_cannot_start_stops_the_container_with_its_status(model_store: Path, tmp_path: Path) -> None:
    """Catches a main process that restarts a front forever when it cannot start at all (here: its keys file is
    missing), instead of stopping with what the front said."""
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "HTTP_WORKERS": str(FRONTS),
           "API_KEYS_FILE": str(tmp_path / "no-such-keys.txt")}
    with running_service(env, tmp_path / "service.log", wait_ready=False) as replica:
        assert replica.process.wait(timeout=120) == 1
    log = replica.log_path.read_text()
    assert "Traceback" not in log
    critical = [json.loads(line)["message"] for line in log.splitlines() if '"CRITICAL"' in line]
    assert any("no-such-keys.txt" in message for message in critical), log
    assert any("before it reached the model owner" in message for message in critical), log
