"""Fixtures shared by every test: a small real exported model that says both "similar" and "not similar", and
pairs of drawn images it decides each way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from contract.compiled import cpp_compiler, ensure_package
from contract.manifest import read_manifest
from deploy.local_cluster import RedisServer, RedisUnavailable, ensure_redis_server
from tests.support.colour_model import export_colour_model
from tests.support.images import class_image, encode, pair_files
from tests.support.system_tools import missing_system_tool

# The paper's datasets (see its README); tests that need them skip, saying so, when they are absent.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# The suite serves model.pt with TorchScript (COMPILE=off, inherited by the services it starts as processes):
# compiling a backbone takes tens of seconds, so the tests of the compiled backbone share one package, compiled once
# a session (`compiled_backbone_cache`).
os.environ["COMPILE"] = "off"
# And in one process (HTTP_WORKERS=0), whatever the CPUs of the machine running the suite: the front-process layout
# is tested where a test asks for it (tests/app/test_container.py, the `layout` fixture, the deployment proof).
os.environ["HTTP_WORKERS"] = "0"

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DECISIONS = ("similar", "dissimilar")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the suite's small model, ``tiny`` (tests/support/colour_model.py): exported with
    training's own export, it scores pairs of one drawn class above its threshold and pairs of two classes
    below."""
    store = tmp_path_factory.mktemp("model_store")
    export_colour_model(store)
    return store


@dataclass(frozen=True)
class DrawnPair:
    """Two image files that ``tiny`` decides as `decision` says: a red and a red shape, or a red and a blue one."""

    decision: str  # "similar" or "dissimilar"
    image1: Path  # JPEG, 96 x 72
    image2: Path  # PNG, 80 x 100

    @property
    def similar(self) -> bool:
        return self.decision == "similar"

    @property
    def files(self) -> dict[str, tuple[str, bytes]]:
        """The multipart form of /similarity and /explain."""
        return pair_files(self.image1.read_bytes(), self.image2.read_bytes())


def drawn_pair(decision: str, folder: Path, seed: int = 0) -> DrawnPair:
    """A pair of files of one class (similar) or of two (dissimilar), written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    first, second = folder / f"{decision}-{seed}-1.jpg", folder / f"{decision}-{seed}-2.png"
    first.write_bytes(encode(class_image("red", seed, (96, 72)), "JPEG", quality=90))
    other = "red" if decision == "similar" else "blue"
    second.write_bytes(encode(class_image(other, seed + 1000, (80, 100)), "PNG"))
    return DrawnPair(decision, first, second)


# Function scope: a parametrized fixture of a wider scope makes pytest reorder the tests of different modules.
@pytest.fixture(params=DECISIONS)
def decided_pair(request: pytest.FixtureRequest, tmp_path: Path) -> DrawnPair:
    """A pair that ``tiny`` decides "similar", then one it decides "dissimilar": a test taking it runs for both."""
    return drawn_pair(request.param, tmp_path)


@pytest.fixture(scope="session")
def compiled_backbone_cache(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the test model's backbone compiled for this machine's CPU: compiled once a session
    (tens of seconds on two cores), by the service's own start-up path (`ensure_package`)."""
    if cpp_compiler() is None:
        missing_system_tool("no C++ compiler (g++) to compile the backbone with: `apt-get install g++`")
    cache = tmp_path_factory.mktemp("compiled_backbones")
    model_dir = model_store / "tiny"
    ensure_package(model_dir, read_manifest(model_dir), cache, torch.device("cpu"))
    return cache


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of its own on a free loopback port (installed as root when missing, like nginx; a
    failure rather than a skip when missing under CI=true); tests may stop and start it again."""
    try:
        binary = ensure_redis_server()
    except RedisUnavailable as reason:
        missing_system_tool(f"no redis-server for the shared rate-limit store: {reason}")
    with RedisServer(binary, tmp_path) as server:
        yield server
