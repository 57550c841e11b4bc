"""Fixtures shared by every test: a small but real exported model, built with training's own export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deploy.local_cluster import RedisServer, RedisUnavailable, ensure_redis_server
from training.export import export_model
from training.model import build_siamese

# The paper's datasets (see its README); tests that need them skip, saying so, when they are absent.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

TEST_MODEL_NAME = "tiny"
TEST_INPUT_SIZE = (128, 128)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding one untrained resnet18 Siamese model named ``tiny``.

    Untrained weights score pairs arbitrarily but exercise every code path of the real thing: same
    architecture, same TorchScript contract, same manifest, same export checks.
    """
    torch.manual_seed(0)
    store = tmp_path_factory.mktemp("model_store")
    model = build_siamese("resnet18", embedding_dim=64)
    export_model(
        model,
        store / TEST_MODEL_NAME,
        {
            "name": TEST_MODEL_NAME,
            "version": "0.0.1",
            "backbone": "resnet18",
            "input_size": list(TEST_INPUT_SIZE),
            "resize_policy": "stretch",
            "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "threshold": 0.5,
            "metrics": {},
            "dataset": {"name": "none (untrained test model)"},
            "training": {"command": "tests/conftest.py", "seed": 0},
        },
    )
    return store


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of its own on a free loopback port (installed as root when missing, like nginx);
    tests may stop and start it again."""
    try:
        binary = ensure_redis_server()
    except RedisUnavailable as reason:
        pytest.skip(f"no redis-server for the shared rate-limit store: {reason}")
    with RedisServer(binary, tmp_path) as server:
        yield server
